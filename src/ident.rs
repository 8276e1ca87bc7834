//! SQL identifiers: the one place where names are quoted for SQL text.

use std::fmt;

/// Quotes an identifier for SQL text, doubling embedded double quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table's schema-qualified name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
}
