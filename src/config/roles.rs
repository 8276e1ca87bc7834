//! A set's file with its master and one slave changing places (switchover,
//! failover, failback): the text is kept as the DBA wrote it, comments and
//! all; only the `DSNn` keys of `[MAIN]` change.

/// The number of line `raw`'s key, when it is a `DSNn` line.
fn dsn_number(raw: &str) -> Option<u32> {
    let trimmed = raw.trim();
    let split = trimmed.find(['=', ':'])?;
    let key = trimmed[..split].trim().to_ascii_uppercase();
    key.strip_prefix("DSN")?.parse().ok()
}

/// The lines of `text` (with their ends), each with its number when it is a
/// `DSNn` line of `[MAIN]`.
fn lines(text: &str) -> Vec<(&str, Option<u32>)> {
    let mut main = false;
    text.split_inclusive('\n')
        .map(|raw| {
            let trimmed = raw.trim();
            if trimmed.starts_with('[') {
                main = trimmed
                    .trim_matches(['[', ']'])
                    .trim()
                    .eq_ignore_ascii_case("MAIN");
            }
            let number = match main && !trimmed.starts_with(['#', ';', '[']) {
                true => dsn_number(raw),
                false => None,
            };
            (raw, number)
        })
        .collect()
}

/// Rewrites each `DSNn` line of `text` that `rename` maps to `Some(m)` as
/// `DSNm` with the same value, and comments out those it maps to `None` with
/// `why`.
fn rewrite(text: &str, rename: impl Fn(u32) -> Option<Option<u32>>, why: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for (raw, number) in lines(text) {
        let trimmed = raw.trim();
        match number.and_then(&rename) {
            None => out.push_str(raw),
            Some(Some(to)) => {
                let value = &trimmed[trimmed.find(['=', ':']).unwrap_or(0) + 1..];
                out.push_str(&format!("DSN{to}={}\n", value.trim()));
            }
            Some(None) => out.push_str(&format!("# {why}: {trimmed}\n")),
        }
    }
    out
}

fn numbers(text: &str) -> Vec<u32> {
    lines(text).into_iter().filter_map(|(_, n)| n).collect()
}

/// `text` with the master (`DSN0`) and slave `slave` changing places.
pub fn swap_master(text: &str, slave: u32) -> Option<String> {
    let found = numbers(text);
    if !found.contains(&0) || !found.contains(&slave) {
        return None;
    }
    let rename = |n: u32| match n {
        0 => Some(Some(slave)),
        n if n == slave => Some(Some(0)),
        _ => None,
    };
    Some(rewrite(text, rename, ""))
}

/// `text` after a failover to slave `slave`: it becomes the master, and the
/// old master's line is kept as a comment saying `why`, for the failback.
pub fn promote(text: &str, slave: u32, why: &str) -> Option<String> {
    let found = numbers(text);
    if !found.contains(&0) || !found.contains(&slave) {
        return None;
    }
    let rename = |n: u32| match n {
        0 => Some(None),
        n if n == slave => Some(Some(0)),
        _ => None,
    };
    Some(rewrite(text, rename, why))
}

/// `text` with a slave line `DSN<slave>=dsn` added to `[MAIN]` (failback):
/// after the last `DSNn` line.
pub fn add_slave(text: &str, slave: u32, dsn: &str) -> String {
    let lines = lines(text);
    let at = lines.iter().rposition(|(_, n)| n.is_some());
    let mut out = String::new();
    for (i, (raw, _)) in lines.iter().enumerate() {
        out.push_str(raw);
        if !raw.ends_with('\n') {
            out.push('\n');
        }
        if Some(i) == at {
            out.push_str(&format!("DSN{slave}={dsn}\n"));
        }
    }
    if at.is_none() {
        out.push_str(&format!("DSN{slave}={dsn}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# the shop\n[MAIN]\nNAME = shop\ndsn0 = host=a dbname=shop\nDSN1=host=b dbname=shop\nDSN2 = host=c dbname=shop\n\n[TABLE public.t]\n# DSN0 here is no key\nCONFLICT=stop\n";

    #[test]
    fn the_master_and_a_slave_change_places_and_the_rest_is_kept() {
        let swapped = swap_master(FILE, 2).unwrap();
        assert_eq!(
            swapped,
            "# the shop\n[MAIN]\nNAME = shop\nDSN2=host=a dbname=shop\nDSN1=host=b dbname=shop\nDSN0=host=c dbname=shop\n\n[TABLE public.t]\n# DSN0 here is no key\nCONFLICT=stop\n"
        );
        assert_eq!(
            swap_master(&swapped, 2).unwrap().lines().nth(3),
            Some("DSN0=host=a dbname=shop")
        );
        assert_eq!(swap_master(FILE, 7), None);
    }

    #[test]
    fn a_promoted_slave_keeps_the_old_master_as_a_comment_and_failback_adds_it() {
        let promoted = promote(FILE, 1, "old master").unwrap();
        assert!(
            promoted
                .contains("\n# old master: dsn0 = host=a dbname=shop\nDSN0=host=b dbname=shop\n"),
            "{promoted}"
        );
        let back = add_slave(&promoted, 1, "host=a dbname=shop");
        assert!(
            back.contains("DSN2 = host=c dbname=shop\nDSN1=host=a dbname=shop\n\n[TABLE"),
            "{back}"
        );
        assert_eq!(
            add_slave("[MAIN]\nDSN0=x", 1, "y"),
            "[MAIN]\nDSN0=x\nDSN1=y\n"
        );
    }
}
