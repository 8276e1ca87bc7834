//! SQL identifiers: the one place where names are quoted for SQL text.

use std::fmt;

/// Quotes an identifier for SQL text, doubling embedded double quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table's schema-qualified name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// The quoted, qualified name for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Reads a name as SQL does: `"Quoted"` kept as written, anything else folded to
/// lower case.
pub fn parse_ident(text: &str) -> Result<String, String> {
    let text = text.trim();
    match text.strip_prefix('"') {
        Some(rest) => {
            let inner = rest
                .strip_suffix('"')
                .filter(|i| !i.is_empty())
                .ok_or_else(|| format!("'{text}' is not a quoted name"))?;
            if inner.replace("\"\"", "").contains('"') {
                return Err(format!("'{text}' is not a quoted name"));
            }
            Ok(inner.replace("\"\"", "\""))
        }
        None if text.is_empty() || text.contains(['"', ' ', '.']) => {
            Err(format!("'{text}' is not a name (quote it with \"…\")"))
        }
        None => Ok(text.to_lowercase()),
    }
}

impl TableName {
    /// Reads `schema.name` (or `name`, in schema public), quoted parts as SQL does.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut quoted = false;
        for (i, c) in text.char_indices() {
            match c {
                '"' => quoted = !quoted,
                '.' if !quoted => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        let mut names = parts
            .into_iter()
            .map(parse_ident)
            .collect::<Result<Vec<_>, _>>()?;
        let name = names.pop().unwrap_or_default();
        match names.len() {
            0 => Ok(TableName {
                schema: "public".into(),
                name,
            }),
            1 => Ok(TableName {
                schema: names.remove(0),
                name,
            }),
            _ => Err(format!("'{text}' is not schema.table")),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(quote_ident("plain"), "\"plain\"");
        assert_eq!(quote_ident("we\"ird name"), "\"we\"\"ird name\"");
        let t = TableName {
            schema: "My Schema".into(),
            name: "select".into(),
        };
        assert_eq!(t.to_string(), "\"My Schema\".\"select\"");
    }

    #[test]
    fn names_are_read_as_sql_reads_them() {
        let t = TableName::parse("Shop.\"Sales 2026\"").unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("shop", "Sales 2026"));
        assert_eq!(TableName::parse("sales").unwrap().schema, "public");
        assert_eq!(TableName::parse("\"a.b\".c").unwrap().schema, "a.b");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("a.").is_err());
        assert_eq!(parse_ident("\"x\"\"y\"").unwrap(), "x\"y");
        assert!(parse_ident("two words").is_err());
    }
}
