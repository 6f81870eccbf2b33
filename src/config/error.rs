//! How configuration errors are named: [`ConfigError`] (which key, what
//! value, why) and the collector every layer pushes to, which masks secret
//! values and remembers which variable or flag gave each setting's
//! effective value, so a check on the whole configuration names what the
//! operator wrote rather than the file key.

use std::collections::HashMap;
use std::fmt;

use super::settings;

/// One bad setting: which key, what value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} = {:?}: {}", self.key, v, self.reason),
            None => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

/// Every error found while loading; start-up stops if there is any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "config error: {e}")?;
        }
        Ok(())
    }
}

/// The errors of one load, in the order found.
#[derive(Debug, Default)]
pub(super) struct Errors {
    list: Vec<ConfigError>,
    /// Setting key → the variable or flag that gave its effective value,
    /// and the value as written there.
    given: HashMap<&'static str, (&'static str, String)>,
}

impl Errors {
    /// An error on `name` (a key path, variable, flag or file), its value
    /// masked when `name` is a secret setting's.
    pub(super) fn push(&mut self, name: &str, value: Option<&str>, reason: String) {
        self.list.push(ConfigError {
            key: name.to_string(),
            value: value.map(|v| settings::mask_for(name, v)),
            reason,
        });
    }

    /// Notes that variable or flag `by` set setting `key` to `raw`.
    pub(super) fn given(&mut self, key: &'static str, by: &'static str, raw: &str) {
        self.given.insert(key, (by, raw.trim().to_string()));
    }

    /// An error found on the effective value of setting `key`: named as the
    /// variable or flag that gave it, with the value as given, if one did.
    pub(super) fn push_checked(&mut self, key: &'static str, value: &str, reason: String) {
        let value = self
            .given
            .get(key)
            .map_or_else(|| value.to_string(), |(_, raw)| raw.clone());
        self.push(self.name_of(key), Some(&value), reason);
    }

    /// What set setting `key`'s effective value: a variable, a flag or the key.
    pub(super) fn name_of(&self, key: &'static str) -> &'static str {
        self.given.get(key).map_or(key, |(by, _)| *by)
    }

    /// `parse(raw)`, or `None` with the error recorded under `name`.
    pub(super) fn parse<T>(
        &mut self,
        name: &str,
        raw: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        parse(raw).map_err(|e| self.push(name, Some(raw), e)).ok()
    }

    /// `ok`, unless an error was found.
    pub(super) fn into_result<T>(self, ok: T) -> Result<T, ConfigErrors> {
        if self.list.is_empty() {
            Ok(ok)
        } else {
            Err(ConfigErrors(self.list))
        }
    }
}
