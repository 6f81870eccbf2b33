//! How one setting's value moves between its field of [`Config`] and the
//! outside: the file's TOML value (its TOML type checked first, with serde's
//! messages), the text of an environment variable or a flag, and the TOML
//! `check-config` prints.
//!
//! A [`Parser`] does that for one kind of value (an address, a duration, a
//! whole number, a list of CIDRs, …); a [`Field`] ties a parser to the
//! field it fills and to the check the whole configuration runs on it, and
//! is what a settings table entry holds, type-erased as a [`Slot`].

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use toml_edit::Value;

use super::file::{Shape, deserialize};
use super::parse::{self, SECRET_MASK, fmt_duration};
use super::rate::RateLimits;
use super::{Config, LogFormat, RateLimitKey, Upstream};

/// Why a file value (or a default) was refused.
#[derive(Debug)]
pub(super) enum Refused {
    /// The wrong TOML type: a shape error.
    Shape(Shape),
    /// The right type, but bad values.
    Values(Vec<Refusal>),
}

/// One bad value: `index` for an element of a list.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) index: Option<usize>,
    pub(super) value: String,
    pub(super) reason: String,
}

impl Refused {
    fn value(value: &str, reason: String) -> Self {
        Self::Values(vec![Refusal {
            index: None,
            value: value.to_string(),
            reason,
        }])
    }
}

/// The TOML type `T`, or a shape error.
fn typed<T: DeserializeOwned>(v: &Value) -> Result<T, Refused> {
    deserialize(v.clone()).map_err(Refused::Shape)
}

/// One kind of setting value.
pub(super) trait Parser: Sync {
    type Value;
    /// From the file's TOML value (as parsed, see `file::deserialize`), or
    /// a default's.
    fn parse_toml(&self, v: &Value) -> Result<Self::Value, Refused>;
    /// From the text of an environment variable or a flag.
    fn parse_text(&self, s: &str) -> Result<Self::Value, String>;
    /// As `check-config` prints it; `None`: unset, not printed.
    fn show(&self, v: &Self::Value) -> Option<toml::Value>;
    /// A secret value of this kind as shown: all of it hidden, unless the
    /// kind knows which part is secret.
    fn mask(&self, _shown: &str) -> String {
        SECRET_MASK.to_string()
    }
}

/// A string in the file, parsed the same way from every source.
pub(super) struct Text<T: 'static> {
    pub(super) parse: fn(&str) -> Result<T, String>,
    pub(super) show: fn(&T) -> String,
}

impl<T> Parser for Text<T> {
    type Value = T;
    fn parse_toml(&self, v: &Value) -> Result<T, Refused> {
        let s: String = typed(v)?;
        (self.parse)(&s).map_err(|r| Refused::value(&s, r))
    }
    fn parse_text(&self, s: &str) -> Result<T, String> {
        (self.parse)(s)
    }
    fn show(&self, v: &T) -> Option<toml::Value> {
        Some(toml::Value::String((self.show)(v)))
    }
}

/// A duration: the file needs a unit (`"30s"`); the environment may also
/// give seconds (`60`, `1.0`), as the legacy `.env` does.
pub(super) struct Dur;

impl Parser for Dur {
    type Value = Duration;
    fn parse_toml(&self, v: &Value) -> Result<Duration, Refused> {
        let s: String = typed(v)?;
        parse::duration(&s).map_err(|r| Refused::value(&s, r))
    }
    fn parse_text(&self, s: &str) -> Result<Duration, String> {
        parse::env_duration(s)
    }
    fn show(&self, v: &Duration) -> Option<toml::Value> {
        Some(toml::Value::String(fmt_duration(*v)))
    }
}

/// A whole number: a TOML integer in the file (`u32`, `usize`, `u64`).
pub(super) struct Whole<T>(PhantomData<fn() -> T>);

impl<T> Parser for Whole<T>
where
    T: DeserializeOwned + std::str::FromStr + TryInto<i64> + Copy,
{
    type Value = T;
    fn parse_toml(&self, v: &Value) -> Result<T, Refused> {
        typed(v)
    }
    fn parse_text(&self, s: &str) -> Result<T, String> {
        parse::whole(s)
    }
    fn show(&self, v: &T) -> Option<toml::Value> {
        Some(toml::Value::Integer((*v).try_into().unwrap_or(i64::MAX)))
    }
}

/// `true`/`false` in the file; `True`, `yes`, `on`, `1`… in the environment.
pub(super) struct Flag;

impl Parser for Flag {
    type Value = bool;
    fn parse_toml(&self, v: &Value) -> Result<bool, Refused> {
        typed(v)
    }
    fn parse_text(&self, s: &str) -> Result<bool, String> {
        parse::bool(s)
    }
    fn show(&self, v: &bool) -> Option<toml::Value> {
        Some(toml::Value::Boolean(*v))
    }
}

/// A number (a TOML float or integer).
pub(super) struct Number;

impl Parser for Number {
    type Value = f64;
    fn parse_toml(&self, v: &Value) -> Result<f64, Refused> {
        typed(v)
    }
    fn parse_text(&self, s: &str) -> Result<f64, String> {
        parse::float(s)
    }
    fn show(&self, v: &f64) -> Option<toml::Value> {
        Some(toml::Value::Float(*v))
    }
}

/// An optional value: set by being given, unset by default.
pub(super) struct Opt<P>(pub(super) P);

impl<P: Parser> Parser for Opt<P> {
    type Value = Option<P::Value>;
    fn parse_toml(&self, v: &Value) -> Result<Self::Value, Refused> {
        self.0.parse_toml(v).map(Some)
    }
    fn parse_text(&self, s: &str) -> Result<Self::Value, String> {
        self.0.parse_text(s).map(Some)
    }
    fn show(&self, v: &Self::Value) -> Option<toml::Value> {
        v.as_ref().and_then(|v| self.0.show(v))
    }
    fn mask(&self, shown: &str) -> String {
        self.0.mask(shown)
    }
}

/// An optional string that an empty one unsets (`LOG_FILE=`), trimmed.
pub(super) struct Blankable<T: 'static> {
    pub(super) make: fn(&str) -> T,
    pub(super) show: fn(&T) -> String,
}

impl<T> Parser for Blankable<T> {
    type Value = Option<T>;
    fn parse_toml(&self, v: &Value) -> Result<Option<T>, Refused> {
        let s: String = typed(v)?;
        Ok(parse::non_empty(&s).map(self.make))
    }
    fn parse_text(&self, s: &str) -> Result<Option<T>, String> {
        Ok(parse::non_empty(s).map(self.make))
    }
    fn show(&self, v: &Option<T>) -> Option<toml::Value> {
        v.as_ref().map(|v| toml::Value::String((self.show)(v)))
    }
}

/// A Redis URL; its password is the secret part.
pub(super) struct RedisUrl;

impl Parser for RedisUrl {
    type Value = String;
    fn parse_toml(&self, v: &Value) -> Result<String, Refused> {
        STRING
            .parse_toml(v)
            .and_then(|s| parse::redis_url(&s).map_err(|r| Refused::value(&s, r)))
    }
    fn parse_text(&self, s: &str) -> Result<String, String> {
        parse::redis_url(s)
    }
    fn show(&self, v: &String) -> Option<toml::Value> {
        STRING.show(v)
    }
    fn mask(&self, shown: &str) -> String {
        parse::mask_url_password(shown)
    }
}

/// A list of strings, each parsed; each bad one is named by its index
/// (`trusted_proxies[2]`). From text: comma-separated.
pub(super) struct List<T: 'static> {
    pub(super) each: fn(&str) -> Result<T, String>,
    pub(super) show: fn(&T) -> String,
}

impl<T> Parser for List<T> {
    type Value = Vec<T>;
    fn parse_toml(&self, v: &Value) -> Result<Vec<T>, Refused> {
        let items: Vec<String> = typed(v)?;
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for (i, s) in items.iter().enumerate() {
            match (self.each)(s) {
                Ok(x) => out.push(x),
                Err(reason) => bad.push(Refusal {
                    index: Some(i),
                    value: s.clone(),
                    reason,
                }),
            }
        }
        if bad.is_empty() {
            Ok(out)
        } else {
            Err(Refused::Values(bad))
        }
    }
    fn parse_text(&self, s: &str) -> Result<Vec<T>, String> {
        s.split(',').map(|p| (self.each)(p.trim())).collect()
    }
    fn show(&self, v: &Vec<T>) -> Option<toml::Value> {
        let items = v.iter().map(|x| toml::Value::String((self.show)(x)));
        Some(toml::Value::Array(items.collect()))
    }
}

/// Body fragments: an empty one would match every body.
pub(super) struct Patterns;

impl Parser for Patterns {
    type Value = Vec<String>;
    fn parse_toml(&self, v: &Value) -> Result<Vec<String>, Refused> {
        let p: Vec<String> = typed(v)?;
        match p.iter().any(String::is_empty) {
            true => Err(Refused::value(
                "\"\"",
                "patterns must not be empty (an empty one matches every body)".into(),
            )),
            false => Ok(p),
        }
    }
    fn parse_text(&self, s: &str) -> Result<Vec<String>, String> {
        let p = self.parse_toml(&Value::Array(s.split(',').map(str::trim).collect()));
        p.map_err(|_| "patterns must not be empty (an empty one matches every body)".into())
    }
    fn show(&self, v: &Vec<String>) -> Option<toml::Value> {
        Some(toml::Value::Array(
            v.iter().map(|p| p.as_str().into()).collect(),
        ))
    }
}

/// A check of a setting's effective value: the reason it is refused.
pub(super) type Check<T> = fn(&T) -> Result<(), String>;

/// A setting's field in [`Config`], its parser, and the check the whole
/// configuration runs on its effective value. Built with [`field!`].
pub(super) struct Field<P: Parser> {
    pub(super) parser: P,
    pub(super) get: fn(&Config) -> &P::Value,
    pub(super) get_mut: fn(&mut Config) -> &mut P::Value,
    pub(super) check: Option<Check<P::Value>>,
}

/// A [`Field`] with its value type erased, as the settings table holds it.
pub(super) trait Slot: Sync {
    /// A shape error of this TOML value, if it has one.
    fn shape(&self, v: &Value) -> Option<Shape>;
    fn set_toml(&self, cfg: &mut Config, v: &Value) -> Result<(), Refused>;
    fn set_text(&self, cfg: &mut Config, s: &str) -> Result<(), String>;
    fn show(&self, cfg: &Config) -> Option<toml::Value>;
    fn check(&self, cfg: &Config) -> Result<(), String>;
    fn mask(&self, shown: &str) -> String;
}

impl<P: Parser> Slot for Field<P>
where
    P::Value: 'static,
{
    fn shape(&self, v: &Value) -> Option<Shape> {
        match self.parser.parse_toml(v) {
            Err(Refused::Shape(s)) => Some(s),
            _ => None,
        }
    }
    fn set_toml(&self, cfg: &mut Config, v: &Value) -> Result<(), Refused> {
        *(self.get_mut)(cfg) = self.parser.parse_toml(v)?;
        Ok(())
    }
    fn set_text(&self, cfg: &mut Config, s: &str) -> Result<(), String> {
        *(self.get_mut)(cfg) = self.parser.parse_text(s)?;
        Ok(())
    }
    fn show(&self, cfg: &Config) -> Option<toml::Value> {
        self.parser.show((self.get)(cfg))
    }
    fn check(&self, cfg: &Config) -> Result<(), String> {
        self.check.map_or(Ok(()), |check| check((self.get)(cfg)))
    }
    fn mask(&self, shown: &str) -> String {
        self.parser.mask(shown)
    }
}

/// `field!(circuit_breaker.threshold, PARSER)` or with a check as a third
/// argument: the [`Field`] of that path of [`Config`], as a `&dyn Slot`.
macro_rules! field {
    ($($f:ident).+, $parser:expr) => {
        field!($($f).+, $parser, None)
    };
    ($($f:ident).+, $parser:expr, $check:expr) => {
        &$crate::config::field::Field {
            parser: $parser,
            get: |c| &c.$($f).+,
            get_mut: |c| &mut c.$($f).+,
            check: $check,
        }
    };
}
pub(super) use field;

// === the parsers the settings table names ===

/// Any string, as given.
pub(super) const STRING: Text<String> = Text {
    parse: |s| Ok(s.to_string()),
    show: String::clone,
};
pub(super) const ADDR: Text<SocketAddr> = Text {
    parse: parse::addr,
    show: ToString::to_string,
};
pub(super) const UPSTREAM: Text<Upstream> = Text {
    parse: parse::upstream,
    show: ToString::to_string,
};
/// An OTLP/HTTP collector's base URL.
pub(super) const OTLP: Text<String> = Text {
    parse: parse::otlp_endpoint,
    show: String::clone,
};
/// An upstream request path.
pub(super) const PATH: Text<String> = Text {
    parse: parse::path,
    show: String::clone,
};
pub(super) const LEVEL: Text<String> = Text {
    parse: parse::level,
    show: String::clone,
};
pub(super) const FORMAT: Text<LogFormat> = Text {
    parse: parse::format,
    show: parse::show_format,
};
/// A Flask-Limiter rate string.
pub(super) const RATE: Text<RateLimits> = Text {
    parse: parse::rate,
    show: ToString::to_string,
};
pub(super) const RATE_KEY: Text<RateLimitKey> = Text {
    parse: parse::rate_key,
    show: parse::show_rate_key,
};
pub(super) const CIDRS: List<IpNet> = List {
    each: parse::cidr,
    show: ToString::to_string,
};
pub(super) const HEADER_NAMES: List<String> = List {
    each: parse::header_name,
    show: String::clone,
};
/// A file to write, none when empty.
pub(super) const FILE_PATH: Blankable<PathBuf> = Blankable {
    make: |s| s.into(),
    show: |p| p.display().to_string(),
};
/// A token, none when empty.
pub(super) const TOKEN: Blankable<String> = Blankable {
    make: str::to_string,
    show: String::clone,
};
pub(super) const USIZE: Whole<usize> = Whole(PhantomData);
pub(super) const U32: Whole<u32> = Whole(PhantomData);
pub(super) const U64: Whole<u64> = Whole(PhantomData);
