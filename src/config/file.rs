//! The TOML file's shape, checked against the settings table: a key is
//! known when it is a setting's key path, a section of them (`[cache]`), or
//! `routes`; anything else is an unknown field. A setting's value must have
//! its parser's TOML type (serde's messages: `invalid type: string "many",
//! expected usize`). Every shape error names its key path and its line,
//! and the rest of the file is still read, so `check-config` reports every
//! error at once.
//!
//! `[[routes]]` entries are read with serde into `route_file::RouteFile`
//! (a route is a record of its own, not a setting); an entry with a shape
//! error loses the offending key and is read again, or is left out when it
//! cannot be read at all (no `name`).

use std::collections::HashMap;
use std::ops::Range;

use serde::de::{DeserializeOwned, IgnoredAny, IntoDeserializer};
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::route_file::RouteFile;
use super::settings::{self, ROUTES, SETTINGS};

/// Past this many shape errors in one text, the rest are not looked for,
/// and none of its values are used.
const MAX_SHAPE_ERRORS: usize = 50;

/// One step of a key path below a key: a table key or an array index.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

/// A TOML value of the wrong type: where below the value, serde's
/// message, and where in the text when the value came from one.
#[derive(Debug)]
pub(super) struct Shape {
    pub(super) path: Vec<Step>,
    pub(super) message: String,
    pub(super) span: Option<Range<usize>>,
}

/// `T` from a TOML value, or where and why it does not fit. The value is
/// toml_edit's, as parsed: a datetime is not a string (as it would be
/// once turned into a `toml::Value`), and errors keep their span.
pub(super) fn deserialize<T: DeserializeOwned>(v: Value) -> Result<T, Shape> {
    serde_path_to_error::deserialize::<_, T>(v.into_deserializer()).map_err(|e| {
        let mut path = Vec::new();
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Map { key } => path.push(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => path.push(Step::Index(*index)),
                _ => break,
            }
        }
        let inner = e.into_inner();
        Shape {
            path,
            message: inner.message().replace('\n', " "),
            span: inner.span(),
        }
    })
}

/// What a TOML text gives.
#[derive(Debug, Default)]
pub(super) struct FileValues {
    /// Shape errors: bad syntax, unknown keys, wrong types.
    pub(super) errors: Vec<String>,
    /// The settings given (their index in [`SETTINGS`], in table order)
    /// with their values.
    pub(super) values: Vec<(usize, Value)>,
    /// The `[[routes]]` entries that could be read, each with its number
    /// in the text (for the value errors' key paths).
    pub(super) routes: Vec<(usize, RouteFile)>,
}

/// Reads a TOML text against the settings table.
pub(super) fn read(text: &str) -> FileValues {
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let msg = e.message().trim_end().replace('\n', " ");
            return FileValues {
                errors: vec![format!("{msg}{}", line(text, e.span()))],
                ..FileValues::default()
            };
        }
    };
    let mut walk = Walk {
        text,
        out: FileValues::default(),
    };
    walk.table(&[], doc.as_table());
    let mut out = walk.out;
    if out.errors.len() >= MAX_SHAPE_ERRORS {
        out.errors.truncate(MAX_SHAPE_ERRORS);
        out.values.clear();
        out.routes.clear();
    }
    // Applied in table order, whatever the file's order.
    out.values.sort_by_key(|(i, _)| *i);
    out
}

struct Walk<'t> {
    text: &'t str,
    out: FileValues,
}

impl Walk<'_> {
    fn full(&self) -> bool {
        self.out.errors.len() >= MAX_SHAPE_ERRORS
    }

    fn error(&mut self, path: &[Step], span: Option<Range<usize>>, message: &str) {
        let line = line(self.text, span);
        self.out
            .errors
            .push(format!("key `{}`: {message}{line}", show(path)));
    }

    /// The keys of a table at `prefix` (`[]` for the top level).
    fn table(&mut self, prefix: &[Step], table: &dyn TableLike) {
        for (k, item) in table.iter() {
            if self.full() {
                return;
            }
            let mut path = prefix.to_vec();
            path.push(Step::Key(k.to_string()));
            let dotted = show(&path);
            // A quoted key with a dot (`"cache.ttl" = 1`) is no key path.
            if k.contains('.') {
                self.unknown(table, prefix, k, item);
            } else if dotted == ROUTES {
                self.routes(item);
            } else if let Some(i) = SETTINGS.iter().position(|s| s.key == dotted) {
                self.setting(&path, i, item);
            } else if settings::is_section(&dotted) {
                match item.as_table_like() {
                    Some(t) => self.table(&path, t),
                    None => {
                        let found = value_of(item).and_then(|v| {
                            let table = deserialize::<HashMap<String, IgnoredAny>>(v);
                            table.err().map(|e| e.message)
                        });
                        let msg = found.unwrap_or_else(|| "expected a table".into());
                        self.error(&path, item.span(), &msg);
                    }
                }
            } else {
                self.unknown(table, prefix, k, item);
            }
        }
    }

    /// Key `k` of the table at `prefix` is no setting or section.
    fn unknown(&mut self, table: &dyn TableLike, prefix: &[Step], k: &str, item: &Item) {
        let fields = settings::fields_of(&show(prefix));
        let msg = format!("unknown field `{k}`, {}", expected(&fields));
        let span = table.key(k).and_then(|key| key.span());
        let mut path = prefix.to_vec();
        path.push(Step::Key(k.into()));
        self.error(&path, span.or_else(|| item.span()), &msg);
    }

    fn setting(&mut self, path: &[Step], i: usize, item: &Item) {
        let Some(v) = value_of(item) else {
            return self.error(path, item.span(), "not a value");
        };
        match SETTINGS[i].value.shape(&v) {
            Some(shape) => {
                let mut full = path.to_vec();
                full.extend(shape.path);
                self.error(&full, shape.span.or_else(|| item.span()), &shape.message);
            }
            None => self.out.values.push((i, v)),
        }
    }

    fn routes(&mut self, item: &Item) {
        let at = [Step::Key(ROUTES.into())];
        let Some(v) = value_of(item) else {
            return self.error(&at, item.span(), "not a value");
        };
        let list = match v {
            Value::Array(list) => list,
            other => {
                let msg = deserialize::<Vec<IgnoredAny>>(other)
                    .err()
                    .map(|e| e.message);
                let msg = msg.unwrap_or_else(|| "expected an array".into());
                return self.error(&at, item.span(), &msg);
            }
        };
        // Where each entry starts, for an error on an entry as a whole.
        let starts: Vec<_> = match item {
            Item::ArrayOfTables(a) => a.iter().map(|t| t.span()).collect(),
            _ => list.iter().map(Value::span).collect(),
        };
        for (i, mut route) in list.into_iter().enumerate() {
            loop {
                if self.full() {
                    return;
                }
                match deserialize::<RouteFile>(route.clone()) {
                    Ok(rf) => {
                        self.out.routes.push((i, rf));
                        break;
                    }
                    Err(e) => {
                        let mut full = vec![Step::Key(ROUTES.into()), Step::Index(i)];
                        full.extend(e.path.iter().cloned());
                        let start = starts.get(i).cloned().flatten();
                        self.error(&full, e.span.or(start), &e.message);
                        // The key is left out and the route read again; an
                        // error on the route as a whole leaves the route out.
                        if !take_out(&mut route, &e.path) {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// ` (line N)` for a span of `text`, or nothing without one.
fn line(text: &str, span: Option<Range<usize>>) -> String {
    span.map(|s| {
        let start = s.start.min(text.len());
        format!(" (line {})", text[..start].matches('\n').count() + 1)
    })
    .unwrap_or_default()
}

/// An item as a value (a table becomes an inline one, spans kept);
/// `None` for an empty item.
fn value_of(item: &Item) -> Option<Value> {
    item.clone().into_value().ok()
}

/// serde's wording for an unknown field's alternatives.
fn expected(fields: &[&str]) -> String {
    match fields {
        [] => "there are no fields".into(),
        [one] => format!("expected `{one}`"),
        [a, b] => format!("expected `{a}` or `{b}`"),
        many => {
            let list: Vec<String> = many.iter().map(|f| format!("`{f}`")).collect();
            format!("expected one of {}", list.join(", "))
        }
    }
}

/// `routes[0].timeout`, as a key path is written in errors.
pub(super) fn show(steps: &[Step]) -> String {
    let mut s = String::new();
    for step in steps {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

/// Takes the key at `path` out of a route so the rest can be read: an
/// element of an array takes its whole array with it. False when there is
/// nothing to take out (the error is on the route as a whole).
fn take_out(route: &mut Value, path: &[Step]) -> bool {
    let keys = path
        .iter()
        .position(|s| matches!(s, Step::Index(_)))
        .map_or(path, |j| &path[..j]);
    let Some((Step::Key(last), parents)) = keys.split_last() else {
        return false;
    };
    let mut at = Some(route);
    for step in parents {
        at = match (at, step) {
            (Some(Value::InlineTable(t)), Step::Key(k)) => t.get_mut(k),
            _ => None,
        };
    }
    match at {
        Some(Value::InlineTable(t)) => t.remove(last).is_some(),
        _ => false,
    }
}
