//! The settings table as people read it: the effective configuration as
//! TOML for `check-config` (secrets masked; itself a valid config file, in
//! the table's order) and the Markdown table of every setting that
//! `docs/configuration.md` carries.

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::Config;
use super::legacy::{IGNORED_ENV, LEGACY};
use super::route_file::{self, RouteFile};
use super::settings::{DefaultValue, ROUTES, SETTINGS};

impl Config {
    /// The effective configuration as TOML, secrets masked: what
    /// `check-config` prints.
    pub fn to_toml(&self) -> String {
        let mut root = Table::default();
        for s in SETTINGS {
            let Some(mut v) = s.value.show(self) else {
                continue;
            };
            if let (true, toml::Value::String(text)) = (s.secret, &v) {
                v = toml::Value::String(s.value.mask(text));
            }
            root.insert(s.key, Node::Value(v));
        }
        root.0
            .push((ROUTES, Node::Routes(route_file::render(&self.routes))));
        toml::to_string_pretty(&root)
            .unwrap_or_else(|e| format!("# could not render the configuration: {e}\n"))
    }
}

/// A table whose keys keep the settings table's order.
#[derive(Default)]
struct Table(Vec<(&'static str, Node)>);

enum Node {
    Value(toml::Value),
    Table(Table),
    Routes(Vec<RouteFile>),
}

impl Table {
    /// Inserts `v` at dotted key path `key`, creating its sections.
    fn insert(&mut self, key: &'static str, v: Node) {
        match key.split_once('.') {
            None => self.0.push((key, v)),
            Some((section, rest)) => {
                let at = match self.0.iter().position(|(k, _)| *k == section) {
                    Some(at) => at,
                    None => {
                        self.0.push((section, Node::Table(Table::default())));
                        self.0.len() - 1
                    }
                };
                if let Some((_, Node::Table(t))) = self.0.get_mut(at) {
                    t.insert(rest, v);
                }
            }
        }
    }
}

impl Serialize for Table {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Value(v) => v.serialize(s),
            Self::Table(t) => t.serialize(s),
            Self::Routes(r) => r.serialize(s),
        }
    }
}

/// The Markdown table of every setting, then the legacy names, as the
/// reference page `docs/configuration.md` carries it.
pub fn settings_markdown() -> String {
    let code = |s: &str| format!("`{s}`");
    let list = |names: &[&str]| match names {
        [] => "–".to_string(),
        _ => names.iter().map(|n| code(n)).collect::<Vec<_>>().join(", "),
    };
    let yes = |b: bool| if b { "yes" } else { "–" };
    let mut out = String::from(
        "| key | environment | flag | default | secret | what it does |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut row = |cells: [&str; 6]| {
        let cells = cells.map(|c| c.replace('|', "\\|"));
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    };
    for s in SETTINGS {
        let default = match s.default {
            DefaultValue::Unset => "unset".to_string(),
            DefaultValue::Computed { doc, .. } => doc.to_string(),
            d => d
                .to_value()
                .map(|v| code(&v.to_string()))
                .unwrap_or_default(),
        };
        row([
            &code(s.key),
            &list(s.env),
            &s.flag.map_or("–".to_string(), code),
            &default,
            yes(s.secret),
            s.doc,
        ]);
    }
    for l in LEGACY {
        row([l.sets, &list(l.env), "–", "–", yes(l.secret), l.doc]);
    }
    row([
        "–",
        &list(IGNORED_ENV),
        "–",
        "–",
        "–",
        "Legacy names that mean nothing to a proxy: accepted and ignored, with one debug log line.",
    ]);
    out
}
