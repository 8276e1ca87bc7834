//! PostgreSQL's logical decoding output plugin `pgoutput`, protocol version 1,
//! with values in text form: what a slot hands out for each change, read from
//! the bytes of one message.
//!
//! The text form of a value is what the type's output function prints, the
//! same form the capture trigger logs, so the rest of the engine takes these
//! rows as it takes the log's.

use std::fmt;

/// A position in the master's WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Reads PostgreSQL's `X/Y` form.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (high, low) = text.trim().split_once('/')?;
        let high = u64::from_str_radix(high, 16).ok()?;
        let low = u64::from_str_radix(low, 16).ok()?;
        (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some(Lsn(high << 32 | low))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// One column's value in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A value stored out of line (TOAST) that the update did not change:
    /// its text is not sent.
    Unchanged,
    /// The type's text form.
    Text(String),
}

/// A table as the master describes it before its first change in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's oid.
    pub oid: u32,
    /// Its schema.
    pub schema: String,
    /// Its name in the schema.
    pub name: String,
    /// `d` default (the primary key), `n` nothing, `f` full row, `i` an index.
    pub identity: u8,
    /// Its published columns, in the order of a row's values.
    pub columns: Vec<Column>,
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Part of the replica identity (the key).
    pub key: bool,
    /// Its type.
    pub type_oid: u32,
    /// Its type modifier (`varchar(n)`, `numeric(p,s)`; -1 for none).
    pub type_modifier: i32,
}

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A transaction starts; it commits at `final_lsn`.
    Begin {
        /// Where its commit record is.
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 UTC.
        time: i64,
        /// Its transaction id.
        xid: u32,
    },
    /// The transaction commits.
    Commit {
        /// Where its commit record is.
        lsn: Lsn,
        /// Where the record after it starts.
        end_lsn: Lsn,
        /// Microseconds since 2000-01-01 UTC.
        time: i64,
    },
    /// The transaction was replayed from another node (replication origin).
    Origin {
        /// The origin's name.
        name: String,
    },
    /// A table's description, sent before its first change and after it changed.
    Relation(Relation),
    /// A type defined outside `pg_catalog` (its name, for reference).
    Type {
        /// The type's oid.
        oid: u32,
    },
    /// A row was inserted.
    Insert {
        /// The table's oid.
        table: u32,
        /// The new row.
        new: Vec<Value>,
    },
    /// `old` is the whole old row (replica identity full) or only its key
    /// (when the key changed); `None` when neither was logged.
    Update {
        /// The table's oid.
        table: u32,
        /// The old row or key.
        old: Option<Vec<Value>>,
        /// `old` holds only the key's values (the others are NULL).
        key_only: bool,
        /// The new row.
        new: Vec<Value>,
    },
    /// A row was deleted.
    Delete {
        /// The table's oid.
        table: u32,
        /// The old row or key.
        old: Vec<Value>,
        /// `old` holds only the key's values (the others are NULL).
        key_only: bool,
    },
    /// Tables were truncated.
    Truncate {
        /// Their oids.
        tables: Vec<u32>,
        /// With `CASCADE`.
        cascade: bool,
        /// With `RESTART IDENTITY`.
        restart_identity: bool,
    },
    /// A message written with `pg_logical_emit_message`.
    Note {
        /// Part of its transaction (else sent at once).
        transactional: bool,
        /// Where it was written.
        lsn: Lsn,
        /// The prefix it was written with.
        prefix: String,
        /// What it says.
        content: Vec<u8>,
    },
}

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable pgoutput message ({kind}) at byte {at}: {what}")]
pub struct DecodeError {
    /// The message's type byte.
    pub kind: char,
    /// Where in the message.
    pub at: usize,
    /// What was wrong there.
    pub what: &'static str,
}

/// Reads one message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader {
        bytes,
        at: 0,
        kind: '?',
    };
    let kind = r.u8()?;
    r.kind = kind as char;
    let message = match kind {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64()?),
            time: r.u64()? as i64,
            xid: r.u32()?,
        },
        b'C' => {
            r.u8()?;
            Message::Commit {
                lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                time: r.u64()? as i64,
            }
        }
        b'O' => {
            r.u64()?;
            Message::Origin { name: r.string()? }
        }
        b'R' => {
            let oid = r.u32()?;
            let schema = r.string()?;
            let name = r.string()?;
            let identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(count as usize);
            for _ in 0..count {
                columns.push(Column {
                    key: r.u8()? & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.u32()? as i32,
                });
            }
            Message::Relation(Relation {
                oid,
                schema,
                name,
                identity,
                columns,
            })
        }
        b'Y' => {
            let oid = r.u32()?;
            r.string()?;
            r.string()?;
            Message::Type { oid }
        }
        b'I' => {
            let table = r.u32()?;
            r.expect(b'N')?;
            Message::Insert {
                table,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let table = r.u32()?;
            let (old, key_only) = match r.u8()? {
                b'N' => (None, false),
                tag @ (b'K' | b'O') => {
                    let old = r.tuple()?;
                    r.expect(b'N')?;
                    (Some(old), tag == b'K')
                }
                _ => return Err(r.error("expected K, O or N")),
            };
            Message::Update {
                table,
                old,
                key_only,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let table = r.u32()?;
            let key_only = match r.u8()? {
                b'K' => true,
                b'O' => false,
                _ => return Err(r.error("expected K or O")),
            };
            Message::Delete {
                table,
                old: r.tuple()?,
                key_only,
            }
        }
        b'T' => {
            let count = r.u32()?;
            let options = r.u8()?;
            let tables = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate {
                tables,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let lsn = Lsn(r.u64()?);
            let prefix = r.string()?;
            let length = r.u32()? as usize;
            Message::Note {
                transactional,
                lsn,
                prefix,
                content: r.take(length)?.to_vec(),
            }
        }
        _ => return Err(r.error("unknown message type")),
    };
    if r.at != bytes.len() {
        return Err(r.error("bytes left after the message"));
    }
    Ok(message)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    kind: char,
}

impl<'a> Reader<'a> {
    fn error(&self, what: &'static str) -> DecodeError {
        DecodeError {
            kind: self.kind,
            at: self.at,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| self.error("message cut short"))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    fn expect(&mut self, tag: u8) -> Result<(), DecodeError> {
        match self.u8()? == tag {
            true => Ok(()),
            false => Err(self.error("unexpected tuple tag")),
        }
    }

    /// A NUL-terminated string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.error("unterminated string"))?;
        let text = String::from_utf8(rest[..len].to_vec())
            .map_err(|_| self.error("a string that is not UTF-8"))?;
        self.at += len + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let count = self.u16()?;
        let mut values = Vec::with_capacity(count as usize);
        for _ in 0..count {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| self.error("a value that is not UTF-8"))?;
                    Value::Text(text.to_string())
                }
                _ => return Err(self.error("unknown value kind")),
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_reads_and_prints_postgresql_form() {
        let lsn = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("nonsense"), None);
        assert_eq!(Lsn::parse("1/100000000"), None);
    }

    #[test]
    fn a_cut_message_is_an_error_not_a_panic() {
        let insert = [b'I', 0, 0, 64, 0, b'N', 0, 1, b't', 0, 0, 0, 5, b'a'];
        let error = decode(&insert).unwrap_err();
        assert_eq!(error.kind, 'I');
        assert_eq!(error.what, "message cut short");
        assert!(decode(&[]).is_err());
        assert!(decode(b"Z").is_err());
    }
}
