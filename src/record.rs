//! Rows in PostgreSQL's record text form (`(1,"a b",)`), the log's row format.

use thiserror::Error;

/// A row's fields in column order; `None` is SQL NULL.
pub type Fields = Vec<Option<String>>;

/// A record text that does not follow PostgreSQL's record syntax.
#[derive(Debug, Error, PartialEq)]
#[error("malformed row text at byte {at}: {what}")]
pub struct RecordError {
    /// Byte offset of the problem.
    pub at: usize,
    /// What was expected there.
    pub what: &'static str,
}

/// Splits a record text into its fields, undoing record_out's quoting.
///
/// An empty unquoted field is NULL; `""` is the empty string. Inside quotes a
/// doubled quote or a backslash escape stands for one character, as record_in reads it.
pub fn parse(text: &str) -> Result<Fields, RecordError> {
    let bytes = text.as_bytes();
    let err = |at, what| RecordError { at, what };
    if bytes.first() != Some(&b'(') {
        return Err(err(0, "expected '('"));
    }
    // A backslash stands for the byte after it, inside quotes or not.
    let escaped = |value: &mut Vec<u8>, i: usize| -> Result<usize, RecordError> {
        value.push(*bytes.get(i + 1).ok_or(err(i, "dangling backslash"))?);
        Ok(i + 2)
    };
    let mut fields = Vec::new();
    let mut i = 1;
    if bytes.get(1) == Some(&b')') && bytes.len() == 2 {
        return Ok(fields);
    }
    loop {
        let mut value = Vec::new();
        let mut quoted_any = false;
        loop {
            match bytes.get(i) {
                None => return Err(err(i, "unterminated row")),
                Some(b',') | Some(b')') => break,
                Some(b'"') => {
                    quoted_any = true;
                    i += 1;
                    loop {
                        match bytes.get(i) {
                            None => return Err(err(i, "unterminated quoted field")),
                            Some(b'"') if bytes.get(i + 1) == Some(&b'"') => {
                                value.push(b'"');
                                i += 2;
                            }
                            Some(b'"') => {
                                i += 1;
                                break;
                            }
                            Some(b'\\') => i = escaped(&mut value, i)?,
                            Some(&c) => {
                                value.push(c);
                                i += 1;
                            }
                        }
                    }
                }
                Some(b'\\') => i = escaped(&mut value, i)?,
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        let field = if value.is_empty() && !quoted_any {
            None
        } else {
            // Only ASCII delimiters were removed, so the bytes are still UTF-8.
            Some(String::from_utf8(value).map_err(|_| err(i, "invalid UTF-8"))?)
        };
        fields.push(field);
        if bytes[i] == b')' {
            if i + 1 != bytes.len() {
                return Err(err(i + 1, "text after ')'"));
            }
            return Ok(fields);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn plain_null_and_empty_fields() {
        assert_eq!(parse("(1,,\"\")").unwrap(), vec![s("1"), None, s("")]);
        assert_eq!(parse("(,)").unwrap(), vec![None, None]);
        assert_eq!(parse("()").unwrap(), Vec::<Option<String>>::new());
    }

    #[test]
    fn quotes_backslashes_and_delimiters() {
        let row = parse(r#"(1,"a ""b"", c","back\\slash","(x)",é)"#).unwrap();
        assert_eq!(
            row,
            vec![s("1"), s("a \"b\", c"), s("back\\slash"), s("(x)"), s("é")]
        );
    }

    #[test]
    fn nested_record_and_array_stay_text() {
        let row = parse(r#"(1,"(2,""x y"")","{1,""a,b"",NULL}")"#).unwrap();
        assert_eq!(row, vec![s("1"), s("(2,\"x y\")"), s("{1,\"a,b\",NULL}")]);
    }

    #[test]
    fn malformed_rows_are_refused() {
        assert!(parse("1,2").is_err());
        assert!(parse("(1,\"2)").is_err());
        assert!(parse("(1,2").is_err());
        assert!(parse("(1)x").is_err());
    }
}
