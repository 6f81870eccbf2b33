//! Reader for the legacy `.env` file, with the syntax python-dotenv (the
//! legacy Flask app's reader) accepts.
//!
//! Written here rather than taken from `dotenvy`: dotenvy rejects unquoted
//! values containing spaces (`DEFAULT_RATE_LIMIT=60 per minute`, a line of the
//! legacy `.env` block) and expands `$VAR`, which python-dotenv does not do in
//! unquoted values. The rules below are python-dotenv's:
//!
//! - blank lines and lines starting with `#` are skipped; `export ` is allowed;
//! - `KEY=value  # comment`: an unquoted value ends at a `#` preceded by
//!   whitespace and is trimmed; inner spaces are kept;
//! - `KEY="value"` / `KEY='value'`: quoted values are taken literally (double
//!   quotes understand `\"`, `\\` and `\n`), and a comment may follow;
//! - `KEY=` is the empty string.

use std::collections::HashMap;

/// A line of the file that could not be read, with its 1-based number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct DotenvError {
    pub line: usize,
    pub reason: String,
}

/// Parses the whole text of a `.env` file into its key/value pairs; a key
/// given twice keeps its last value, as python-dotenv does.
pub fn parse(text: &str) -> Result<HashMap<String, String>, DotenvError> {
    let mut out = HashMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let err = |reason: &str| DotenvError {
            line: idx + 1,
            reason: reason.to_string(),
        };
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| err("expected KEY=value"))?;
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
        {
            return Err(err("invalid variable name"));
        }
        let value = parse_value(value.trim_start()).map_err(err)?;
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

fn parse_value(v: &str) -> Result<String, &'static str> {
    let mut chars = v.chars();
    match chars.next() {
        Some(q @ ('"' | '\'')) => {
            let mut out = String::new();
            let mut escaped = false;
            for (i, c) in v.char_indices().skip(1) {
                if escaped {
                    out.push(match c {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    let rest = v[i + c.len_utf8()..].trim_start();
                    if rest.is_empty() || rest.starts_with('#') {
                        return Ok(out);
                    }
                    return Err("unexpected text after the closing quote");
                } else {
                    out.push(c);
                }
            }
            Err("unterminated quoted value")
        }
        _ => {
            // An unquoted value ends where a comment starts: a `#` after whitespace.
            let mut end = v.len();
            let mut prev_ws = false;
            for (i, c) in v.char_indices() {
                if c == '#' && prev_ws {
                    end = i;
                    break;
                }
                prev_ws = c.is_whitespace();
            }
            Ok(v[..end].trim().to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_syntax() {
        let env = parse(
            "# header\n\nUSE_REDIS=False  # Set to True\nREDIS_PASSWORD=\n\
             DEFAULT_RATE_LIMIT=60 per minute\nA=x#not-a-comment\nexport B = 'q # kept'  # c\n\
             C=\"a \\\"b\\\"\"\n",
        )
        .unwrap();
        assert_eq!(env["USE_REDIS"], "False");
        assert_eq!(env["REDIS_PASSWORD"], "");
        assert_eq!(env["DEFAULT_RATE_LIMIT"], "60 per minute");
        assert_eq!(env["A"], "x#not-a-comment");
        assert_eq!(env["B"], "q # kept");
        assert_eq!(env["C"], "a \"b\"");
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("A=1\nnonsense\n").unwrap_err().line, 2);
        assert_eq!(parse("A=\"open\n").unwrap_err().line, 1);
        assert_eq!(parse("A='x' y\n").unwrap_err().line, 1);
        assert_eq!(parse("=x\n").unwrap_err().line, 1);
    }
}
