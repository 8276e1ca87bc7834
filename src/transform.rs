//! Transform scripts: Lua functions that reshape rows, sandboxed and limited in time and memory.
//!
//! A script is a file that defines `transform(op, row)`. `op` is `"insert"`,
//! `"update"` or `"delete"`; `row` is a table of column name → text (`nil` for
//! NULL). It returns the row to apply (changed or not), nothing to drop it, or
//! several rows. For an update the function is called on the row before and on
//! the row after the change, and the results are paired in order.
//!
//! Lua 5.4 (through mlua) rather than Rhai: it enforces a real memory limit
//! (its allocator counts every byte), its instruction hook bounds run time, its
//! errors carry the script's file and line, and it is several times faster per
//! call, which matters on a path that runs for every row.

use crate::record::Fields;
use mlua::{HookTriggers, Lua, LuaOptions, StdLib, Value, VmState};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often (in Lua instructions) a running script's time is checked.
const CHECK_EVERY: u32 = 10_000;

/// The most steps a pattern match may be expected to take in the worst case
/// (the subject's length to the power of the pattern's repeated items).
const PATTERN_STEPS: f64 = 1e10;

/// What the sandbox puts around the library. `pcall` and `xpcall` hand back
/// an error once the time limit has passed instead of catching it, so a
/// script cannot run on past it; pattern functions refuse a pattern whose
/// backtracking could run for ages inside the library, where the time limit
/// is never checked.
const GUARDS: &str = r#"
local expired, steps = ...
local raw_pcall, raw_xpcall, error, type, tostring = pcall, xpcall, error, type, tostring
local pack, unpack = table.pack, table.unpack
local len, sub = string.len, string.sub
-- Where the set starting at `i` ("[") ends.
local function set_end(p, i)
  local j = i + 1
  if sub(p, j, j) == "^" then j = j + 1 end
  if sub(p, j, j) == "]" then j = j + 1 end
  while j <= len(p) do
    local c = sub(p, j, j)
    if c == "%" then j = j + 2 elseif c == "]" then return j else j = j + 1 end
  end
  return len(p)
end
-- The pattern's items repeated by "*", "+" or "-", each of which may make
-- the matcher try every length of the text again.
local function repeats(p)
  local n, i = 0, 1
  if sub(p, 1, 1) == "^" then i = 2 end
  while i <= len(p) do
    local c, last = sub(p, i, i), i
    if c == "%" then
      local d = sub(p, i + 1, i + 1)
      if d == "b" then last = nil; i = i + 4
      elseif d == "f" then last = nil; i = set_end(p, i + 2) + 1
      else last = i + 1 end
    elseif c == "[" then last = set_end(p, i)
    elseif c == "(" or c == ")" then last = nil; i = i + 1
    end
    if last then
      local q = sub(p, last + 1, last + 1)
      if q == "*" or q == "+" or q == "-" then n = n + 1; i = last + 2
      elseif q == "?" then i = last + 2
      else i = last + 1 end
    end
  end
  return n
end
local function settle(r)
  if not r[1] and expired() then error(r[2], 0) end
  return unpack(r, 1, r.n)
end
pcall = function(...) return settle(pack(raw_pcall(...))) end
-- The handler runs where the error was raised; for the time limit that is
-- inside the instruction hook, where no hook would stop it again.
xpcall = function(f, handler, ...)
  return settle(pack(raw_xpcall(f, function(e)
    if expired() then return e end
    return handler(e)
  end, ...)))
end
local function guarded(name, f)
  string[name] = function(s, p, ...)
    if type(s) == "string" and type(p) == "string" then
      local r = repeats(p)
      if r >= 2 and len(s) ^ r > steps then
        error("string." .. name .. ": pattern '" .. p .. "' could take too long on a text of "
              .. len(s) .. " bytes (" .. r .. " repeated items): use fewer, or anchor it", 2)
      end
    end
    return f(s, p, ...)
  end
end
for _, name in ipairs({"find", "match", "gmatch", "gsub"}) do guarded(name, string[name]) end
"#;

/// The scripts of one set, in one Lua state.
pub struct Scripts {
    lua: Lua,
    functions: Vec<(String, mlua::Function)>,
    limit: Duration,
    /// The running call's deadline, in nanoseconds since `epoch`.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
}

/// A row a script gave back: the values of the columns it was given (in their
/// order), and the columns it added, by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Returned {
    /// One value per column given, `None` for NULL or absent.
    pub fields: Fields,
    /// Columns the script added, in the order it set them.
    pub added: Vec<(String, Option<String>)>,
}

impl Scripts {
    /// An empty Lua state with only the safe libraries (no files, no OS), a
    /// memory limit in bytes, and a time limit per call.
    pub fn new(memory: usize, limit: Duration) -> Result<Scripts, String> {
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(|e| e.to_string())?;
        let globals = lua.globals();
        for unsafe_global in ["dofile", "loadfile", "load", "print", "collectgarbage"] {
            globals
                .raw_set(unsafe_global, Value::Nil)
                .map_err(|e| e.to_string())?;
        }
        lua.set_memory_limit(memory).map_err(|e| e.to_string())?;
        let deadline = Arc::new(AtomicU64::new(u64::MAX));
        let epoch = Instant::now();
        let past = deadline.clone();
        let expired = lua
            .create_function(move |_, ()| {
                Ok(epoch.elapsed().as_nanos() as u64 > past.load(Ordering::Relaxed))
            })
            .map_err(|e| e.to_string())?;
        lua.load(GUARDS)
            .set_name("=pgreplica")
            .call::<()>((expired, PATTERN_STEPS))
            .map_err(|e| e.to_string())?;
        let hook_deadline = deadline.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            move |_, _| {
                let now = epoch.elapsed().as_nanos() as u64;
                if now > hook_deadline.load(Ordering::Relaxed) {
                    return Err(mlua::Error::RuntimeError(format!(
                        "ran longer than its time limit ({} s)",
                        limit.as_secs_f64()
                    )));
                }
                Ok(VmState::Continue)
            },
        );
        Ok(Scripts {
            lua,
            functions: Vec::new(),
            limit,
            deadline,
            epoch,
        })
    }

    /// Loads a script file; returns its number for [`Scripts::call`]. A script
    /// already loaded is not loaded again.
    pub fn load(&mut self, path: &Path) -> Result<usize, String> {
        let name = path.display().to_string();
        if let Some(i) = self.functions.iter().position(|(n, _)| *n == name) {
            return Ok(i);
        }
        let source = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        // Each script has its own globals, so that every one can define `transform`.
        let env = self.lua.create_table().map_err(lua_message)?;
        let meta = self.lua.create_table().map_err(lua_message)?;
        meta.raw_set("__index", self.lua.globals())
            .map_err(lua_message)?;
        env.set_metatable(Some(meta));
        self.arm();
        self.lua
            .load(source)
            .set_name(format!("@{name}"))
            .set_environment(env.clone())
            .exec()
            .map_err(lua_message)?;
        let function = match env.raw_get::<Value>("transform").map_err(lua_message)? {
            Value::Function(f) => f,
            _ => return Err("defines no function transform(op, row)".into()),
        };
        self.functions.push((name, function));
        Ok(self.functions.len() - 1)
    }

    /// How many scripts are loaded.
    pub fn loaded(&self) -> usize {
        self.functions.len()
    }

    /// The file of script `script`.
    pub fn name(&self, script: usize) -> &str {
        &self.functions[script].0
    }

    /// Runs script `script` on one row (`columns` names its fields); returns
    /// the rows it gives back.
    pub fn call(
        &self,
        script: usize,
        op: &str,
        columns: &[String],
        row: &Fields,
    ) -> Result<Vec<Returned>, String> {
        let lua = &self.lua;
        let table = lua
            .create_table_with_capacity(0, row.len())
            .map_err(lua_message)?;
        for (name, value) in columns.iter().zip(row) {
            if let Some(value) = value {
                table
                    .raw_set(name.as_str(), value.as_str())
                    .map_err(lua_message)?;
            }
        }
        self.arm();
        let results: mlua::MultiValue = self.functions[script]
            .1
            .call((op, table))
            .map_err(lua_message)?;
        let mut rows = Vec::with_capacity(results.len());
        for (i, result) in results.into_iter().enumerate() {
            let Value::Table(t) = result else {
                if result.is_nil() && i == 0 {
                    continue;
                }
                return Err(format!(
                    "returned a {} as row {}, not a table",
                    result.type_name(),
                    i + 1
                ));
            };
            let mut out = Returned {
                fields: vec![None; columns.len()],
                added: Vec::new(),
            };
            for pair in t.pairs::<mlua::String, Value>() {
                let (name, value) = pair.map_err(lua_message)?;
                let name = name.to_str().map_err(lua_message)?;
                let value = text(value)?;
                match columns.iter().position(|c| *c == *name) {
                    Some(at) => out.fields[at] = value,
                    None => out.added.push((name.to_string(), value)),
                }
            }
            rows.push(out);
        }
        Ok(rows)
    }

    /// Starts the time limit of a call.
    fn arm(&self) {
        let deadline = (self.epoch.elapsed() + self.limit).as_nanos() as u64;
        self.deadline.store(deadline, Ordering::Relaxed);
    }
}

/// A value returned for a column, as the text PostgreSQL reads.
fn text(value: Value) -> Result<Option<String>, String> {
    Ok(match value {
        Value::Nil => None,
        Value::String(s) => Some(s.to_str().map_err(lua_message)?.to_string()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        other => return Err(format!("a column's value is a {}", other.type_name())),
    })
}

/// A Lua error's first line: the script, line and message, without Lua's
/// stack traceback.
fn lua_message(e: mlua::Error) -> String {
    let text = match &e {
        mlua::Error::CallbackError { cause, .. } => cause.to_string(),
        mlua::Error::MemoryError(_) => "used more than its memory limit".to_string(),
        other => other.to_string(),
    };
    let first = text.lines().next().unwrap_or_default();
    first
        .trim_start_matches("runtime error: ")
        .trim_start_matches("syntax error: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(source: &str) -> (Scripts, usize, tempfile_path::TempScript) {
        let file = tempfile_path::TempScript::new(source);
        let mut scripts = Scripts::new(16 << 20, Duration::from_secs(2)).unwrap();
        let n = scripts.load(&file.path).unwrap();
        (scripts, n, file)
    }

    mod tempfile_path {
        pub struct TempScript {
            pub path: std::path::PathBuf,
        }
        impl TempScript {
            pub fn new(source: &str) -> TempScript {
                let path = std::env::temp_dir().join(format!(
                    "pgreplica-test-{}-{}.lua",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                std::fs::write(&path, source).unwrap();
                TempScript { path }
            }
        }
        impl Drop for TempScript {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    fn call(
        s: &Scripts,
        n: usize,
        op: &str,
        pairs: &[(&str, Option<&str>)],
    ) -> Result<Vec<Returned>, String> {
        let columns: Vec<String> = pairs.iter().map(|(c, _)| c.to_string()).collect();
        let row: Fields = pairs.iter().map(|(_, v)| v.map(String::from)).collect();
        s.call(n, op, &columns, &row)
    }

    fn values(v: &[Option<&str>]) -> Fields {
        v.iter().map(|v| v.map(String::from)).collect()
    }

    #[test]
    fn a_script_changes_drops_and_splits_rows() {
        let (s, n, _f) = script(
            "function transform(op, row)
               if row.kind == 'skip' then return end
               if row.kind == 'pair' then
                 local a, b = {id = row.id, kind = 'a'}, {id = row.id .. '0', kind = 'b'}
                 return a, b
               end
               row.amount = tonumber(row.amount) * 100
               row.note = nil
               return row
             end",
        );
        let out = call(
            &s,
            n,
            "insert",
            &[
                ("id", Some("1")),
                ("kind", Some("x")),
                ("amount", Some("2.5")),
                ("note", Some("n")),
            ],
        )
        .unwrap();
        assert_eq!(
            out[0].fields,
            values(&[Some("1"), Some("x"), Some("250"), None])
        );
        assert!(
            call(&s, n, "insert", &[("kind", Some("skip"))])
                .unwrap()
                .is_empty()
        );
        let split = call(
            &s,
            n,
            "delete",
            &[("id", Some("7")), ("kind", Some("pair"))],
        )
        .unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(split[1].fields, values(&[Some("70"), Some("b")]));
    }

    #[test]
    fn errors_name_the_script_and_line_and_limits_hold() {
        let (s, n, f) = script("function transform(op, row)\n  return row.x.y\nend\n");
        let e = call(&s, n, "insert", &[]).unwrap_err();
        let name = f.path.display().to_string();
        assert!(e.starts_with(&format!("{name}:2:")), "{e}");
        let (s, n, _f) = script("function transform(op, row) while true do end end");
        let e = call(&s, n, "insert", &[]).unwrap_err();
        assert!(e.contains("time limit"), "{e}");
        let (s, n, _f) = script(
            "function transform(op, row) local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(100) .. i end end",
        );
        let e = call(&s, n, "insert", &[]).unwrap_err();
        assert!(e.contains("memory limit"), "{e}");
        let (s, n, _f) = script("function transform(op, row) return io.open('/etc/passwd') end");
        assert!(call(&s, n, "insert", &[]).is_err());
        let file = tempfile_path::TempScript::new("function transform(op, row) return row");
        let e = Scripts::new(1 << 20, Duration::from_secs(1))
            .unwrap()
            .load(&file.path)
            .unwrap_err();
        assert!(e.contains(&file.path.display().to_string()), "{e}");
    }

    #[test]
    fn the_time_limit_cannot_be_caught_nor_escaped_in_a_library_call() {
        for body in [
            "while true do pcall(function() while true do end end) end",
            "while true do xpcall(function() while true do end end, function() while true do end end) end",
        ] {
            let (s, n, _f) = script(&format!("function transform(op, row) {body} end"));
            let e = call(&s, n, "insert", &[]).unwrap_err();
            assert!(e.contains("time limit"), "{body}: {e}");
        }
        // An error the script raises itself is still its own to catch.
        let (s, n, _f) = script(
            "function transform(op, row)
               local ok, e = pcall(error, 'mine')
               row.caught = tostring(ok) .. ' ' .. e
               return row
             end",
        );
        let out = call(&s, n, "insert", &[]).unwrap();
        assert_eq!(
            out[0].added,
            [("caught".to_string(), Some("false mine".into()))]
        );
        // A pattern whose matching would run for ages inside the library.
        let (s, n, _f) = script(
            "function transform(op, row)
               return {hit = tostring(string.rep('a', 60):find(string.rep('a-', 30) .. 'b'))}
             end",
        );
        let e = call(&s, n, "insert", &[]).unwrap_err();
        assert!(e.contains("could take too long"), "{e}");
        // Ordinary patterns are untouched.
        let (s, n, _f) = script(
            "function transform(op, row)
               local y, m, d = row.day:match('^(%d+)-(%d+)-(%d+)$')
               local long = string.rep('-', 2000)
               return {day = d .. '.' .. m .. '.' .. y, trimmed = ('  x  '):gsub('^%s*(.-)%s*$', '%1'),
                       dashes = #(long:match('^%s*(.-)%s*$'))}
             end",
        );
        let out = call(&s, n, "insert", &[("day", Some("2026-11-27"))]).unwrap();
        assert_eq!(out[0].fields, values(&[Some("27.11.2026")]));
    }
}
