//! Connection strings read as libpq reads them, `key=value …` or a
//! `postgresql://` URI, into their settings: what is redacted, what goes to
//! the TLS layer, and what reaches the driver.

use std::fmt;

/// A connection string's settings, in the order written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dsn(pub Vec<(String, String)>);

/// Why a connection string does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnError(pub String);

impl fmt::Display for DsnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Dsn {
    /// Reads either form.
    pub fn parse(text: &str) -> Result<Dsn, DsnError> {
        let text = text.trim();
        match ["postgresql://", "postgres://"]
            .iter()
            .find_map(|p| text.strip_prefix(p))
        {
            Some(rest) => parse_uri(rest),
            None => parse_pairs(text),
        }
    }

    /// The value of `key`, the last one written.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Removes `key` and returns its value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let value = self.get(key).map(str::to_string);
        self.0.retain(|(k, _)| k != key);
        value
    }

    /// The `key=value …` form, values quoted where needed.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The `key=value …` form with the password hidden.
    pub fn redacted(&self) -> String {
        let hidden = Dsn(self
            .0
            .iter()
            .map(|(k, v)| match k.as_str() {
                "password" => (k.clone(), "***".to_string()),
                _ => (k.clone(), v.clone()),
            })
            .collect());
        hidden.render()
    }
}

/// A connection string fit for logs, mails and status: its password hidden,
/// and nothing of it shown when it does not parse (it may hold one).
pub fn redact(text: &str) -> String {
    match Dsn::parse(text) {
        Ok(dsn) => dsn.redacted(),
        Err(_) => "(a connection string that does not parse, not shown)".to_string(),
    }
}

fn quote(value: &str) -> String {
    if !value.is_empty() && !value.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return value.to_string();
    }
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

/// `key = value` pairs; a value is a word or a quoted string with `\'` and `\\`.
fn parse_pairs(text: &str) -> Result<Dsn, DsnError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(Dsn(pairs));
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(DsnError(format!("\"{key}\" is missing \"=\" and a value")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(DsnError(format!("the value of {key} is cut short"))),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(DsnError(format!(
                            "the quote of {key}'s value is not closed"
                        )));
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(DsnError("a setting without a name".into()));
        }
        pairs.push((key, value));
    }
}

/// `[user[:password]@][host[:port][,…]][/dbname][?key=value&…]`, percent-encoded.
fn parse_uri(rest: &str) -> Result<Dsn, DsnError> {
    let mut pairs = Vec::new();
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, dbname) = main.split_once('/').unwrap_or((main, ""));
    let (user_info, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(info) = user_info {
        let (user, password) = match info.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (info, None),
        };
        if !user.is_empty() {
            pairs.push(("user".into(), decode(user)?));
        }
        if let Some(p) = password {
            pairs.push(("password".into(), decode(p)?));
        }
    }
    let (mut names, mut ports) = (Vec::new(), Vec::new());
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let (name, port) = match host.strip_prefix('[') {
            Some(v6) => {
                let (name, after) = v6
                    .split_once(']')
                    .ok_or_else(|| DsnError(format!("host \"{host}\" lacks its \"]\"")))?;
                (name, after.strip_prefix(':'))
            }
            None => match host.rsplit_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (host, None),
            },
        };
        names.push(decode(name)?);
        ports.push(port.map(decode).transpose()?.unwrap_or_default());
    }
    if !names.is_empty() {
        pairs.push(("host".into(), names.join(",")));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        pairs.push(("port".into(), ports.join(",")));
    }
    if !dbname.is_empty() {
        pairs.push(("dbname".into(), decode(dbname)?));
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| DsnError(format!("\"{param}\" is missing \"=\" and a value")))?;
        pairs.push((decode(key)?, decode(value)?));
    }
    Ok(Dsn(pairs))
}

fn decode(text: &str) -> Result<String, DsnError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DsnError("a bad %-escape".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DsnError("a %-escape that is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_however_they_are_written() {
        for (text, shown) in [
            (
                "dbname=a user=u password=secret host=h",
                "dbname=a user=u password=*** host=h",
            ),
            (
                "dbname=a password = s3cret host=h",
                "dbname=a password=*** host=h",
            ),
            (
                r"dbname=a password='it\'s a \\ secret' host=h",
                "dbname=a password=*** host=h",
            ),
            (
                "postgresql://u:secret@h:5432/db?sslmode=disable",
                "user=u password=*** host=h port=5432 dbname=db sslmode=disable",
            ),
            (
                "postgres://h/db?user=u&password=secret",
                "host=h dbname=db user=u password=***",
            ),
            (
                "postgresql://u:p%40ss@[::1]:5433/d%20b",
                "user=u password=*** host=::1 port=5433 dbname='d b'",
            ),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
        // Nothing of a string that does not parse is shown.
        for bad in ["host=h password='secret", "host=h password", "password"] {
            assert!(!redact(bad).contains("secret"), "{bad}");
            assert!(redact(bad).contains("not shown"), "{bad}");
        }
    }

    #[test]
    fn settings_read_back_as_written() {
        let dsn = Dsn::parse(r"host=h dbname='my db' sslrootcert=/a\ b/ca.pem").unwrap();
        assert_eq!(dsn.get("dbname"), Some("my db"));
        assert_eq!(dsn.get("sslrootcert"), Some("/a b/ca.pem"));
        assert_eq!(Dsn::parse(&dsn.render()).unwrap(), dsn);
    }
}
