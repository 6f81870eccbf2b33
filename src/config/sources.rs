//! Where settings come from, and in which order: built-in defaults < TOML
//! file (`--config` or `RAG_SIDECAR_CONFIG`) < `.env` in the working
//! directory < process environment < command-line flags. Each layer walks
//! the settings table: the file gives key paths, the environment a
//! setting's variables, the command line its flag. Environment access goes
//! through the [`Strings`] trait so tests inject a map instead of mutating
//! the process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::{ConfigErrors, Errors};
use super::field::Refused;
use super::legacy::{IGNORED_ENV, LEGACY};
use super::route_file::{self, Pending};
use super::settings::{SETTINGS, Setting};
use super::{Config, dotenv, file, validate};

/// Where environment-style settings come from (the process, or a map in tests).
pub trait Strings {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Strings for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// The process environment over the `.env` file: the process wins.
struct EnvLayers<'a> {
    process: &'a dyn Strings,
    dotenv: HashMap<String, String>,
}

impl Strings for EnvLayers<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.process
            .get(key)
            .or_else(|| self.dotenv.get(key).cloned())
    }
}

/// The values given on the command line (the highest-precedence layer).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin_listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub threads: Option<String>,
}

impl Overrides {
    /// The value given for a settings table flag (`--threads`). A new flag
    /// in the table needs its field here and in the binary's command line;
    /// the test `every_flag_has_its_override` checks the first.
    pub(super) fn flag(&self, flag: &str) -> Option<&str> {
        let v = match flag {
            "--listen" => &self.listen,
            "--upstream" => &self.upstream,
            "--admin-listen" => &self.admin_listen,
            "--log-level" => &self.log_level,
            "--log-format" => &self.log_format,
            "--threads" => &self.threads,
            _ => return None,
        };
        v.as_deref()
    }
}

/// The env name of the config file path.
pub const ENV_CONFIG: &str = "RAG_SIDECAR_CONFIG";

/// What loading found besides the configuration itself, for logging once
/// the logger exists.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub config_file: Option<PathBuf>,
    pub dotenv_file: Option<PathBuf>,
    pub ignored_env: Vec<String>,
}

/// A configuration being built, layer after layer.
struct Loading {
    cfg: Config,
    errs: Errors,
    pending: Pending,
}

impl Config {
    /// Loads from every layer; `cwd` is where `.env` is looked for.
    pub fn load(
        overrides: &Overrides,
        env: &dyn Strings,
        cwd: &Path,
    ) -> Result<(Self, LoadReport), ConfigErrors> {
        let mut l = Loading::new();
        let mut report = LoadReport::default();

        // Errors name where the path came from: the flag or the variable.
        let path = overrides
            .config
            .clone()
            .map(|p| (p, "--config"))
            .or_else(|| {
                env.get(ENV_CONFIG)
                    .filter(|s| !s.is_empty())
                    .map(|p| (PathBuf::from(p), ENV_CONFIG))
            });
        if let Some((path, given_as)) = path {
            let shown = path.display().to_string();
            match std::fs::read_to_string(&path) {
                Ok(text) => l.file(&text, &shown),
                Err(e) => l.errs.push(given_as, Some(&shown), e.to_string()),
            }
            report.config_file = Some(path);
        }

        let dotenv_path = cwd.join(".env");
        let shown = dotenv_path.display().to_string();
        let dotenv = match std::fs::read_to_string(&dotenv_path) {
            Ok(text) => {
                report.dotenv_file = Some(dotenv_path);
                dotenv::parse(&text).unwrap_or_else(|e| {
                    l.errs.push(&shown, None, e.to_string());
                    HashMap::new()
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                l.errs.push(&shown, None, e.to_string());
                HashMap::new()
            }
        };
        let layers = EnvLayers {
            process: env,
            dotenv,
        };
        l.env(&layers);
        report.ignored_env = IGNORED_ENV
            .iter()
            .filter(|k| layers.get(k).is_some())
            .map(|k| k.to_string())
            .collect();

        l.flags(overrides);
        // A value from `.env` says so: a person looks for a bad variable in
        // their shell first.
        let from_dotenv = |k: &str| env.get(k).is_none() && layers.dotenv.contains_key(k);
        l.finish()
            .map(|cfg| (cfg, report))
            .map_err(|ConfigErrors(list)| {
                ConfigErrors(
                    list.into_iter()
                        .map(|mut e| {
                            if from_dotenv(&e.key) {
                                e.reason = format!("{} (set in {shown})", e.reason);
                            }
                            e
                        })
                        .collect(),
                )
            })
    }

    /// The configuration a TOML text alone gives (defaults < the text), for
    /// tools and fuzzing: no file, `.env` or environment is read.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let mut l = Loading::new();
        l.file(text, "config");
        l.finish()
    }
}

impl Loading {
    fn new() -> Self {
        Self {
            cfg: Config::default(),
            errs: Errors::default(),
            pending: Pending::default(),
        }
    }

    /// A TOML text's shape errors (under `name`, the file), then its
    /// values, so that one run reports both kinds.
    fn file(&mut self, text: &str, name: &str) {
        let read = file::read(text);
        for e in read.errors {
            self.errs.push(name, None, e);
        }
        for (i, v) in &read.values {
            let s = &SETTINGS[*i];
            match s.value.set_toml(&mut self.cfg, v) {
                Ok(()) => {}
                Err(Refused::Shape(e)) => self.errs.push(name, None, e.message),
                Err(Refused::Values(bad)) => {
                    for b in bad {
                        let key = match b.index {
                            Some(j) => format!("{}[{j}]", s.key),
                            None => s.key.to_string(),
                        };
                        self.errs.push(&key, Some(&b.value), b.reason);
                    }
                }
            }
        }
        for (i, rf) in &read.routes {
            route_file::apply(&mut self.cfg, *i, rf, &mut self.errs, &mut self.pending);
        }
    }

    /// The settings' own variables (the first of a setting's names that is
    /// set), then the legacy composite names.
    fn env(&mut self, env: &dyn Strings) {
        for s in SETTINGS {
            let given = s.env.iter().find_map(|&name| Some((name, env.get(name)?)));
            if let Some((name, raw)) = given {
                self.text(s, name, &raw);
            }
        }
        for legacy in LEGACY {
            (legacy.apply)(&mut self.cfg, env, &mut self.errs, &mut self.pending);
        }
    }

    fn flags(&mut self, overrides: &Overrides) {
        for s in SETTINGS {
            if let Some((flag, raw)) = s.flag.and_then(|f| Some((f, overrides.flag(f)?))) {
                self.text(s, flag, raw);
            }
        }
    }

    /// Setting `s` as variable or flag `by` gives it.
    fn text(&mut self, s: &Setting, by: &'static str, raw: &str) {
        match s.value.set_text(&mut self.cfg, raw) {
            Ok(()) => self.errs.given(s.key, by, raw),
            Err(reason) => self.errs.push(by, Some(raw), reason),
        }
    }

    /// Fills the per-route defaults that depend on other keys, then checks
    /// what only the whole configuration can tell.
    fn finish(mut self) -> Result<Config, ConfigErrors> {
        self.pending.fill(&mut self.cfg);
        validate::check(&self.cfg, &mut self.errs);
        self.errs.into_result(self.cfg)
    }
}
