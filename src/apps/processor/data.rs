//! Where a `DatasetMeta.dataset_id` points and how its rows are read. Nothing is downloaded.
//!
//! * A local path (file or directory). Relative paths resolve against `$TWINKLE_DATA_DIR` when
//!   it is set, else against the process's working directory, and local paths must stay inside
//!   that root and outside the checkpoint tree and `$TWINKLE_HOME` (a multi-tenant server must
//!   not serve arbitrary files).
//! * `ms://Org/Name`: the local ModelScope cache only (`$MODELSCOPE_CACHE`, else
//!   `~/.cache/modelscope/hub`), directories `datasets/Org/Name` and `datasets/Org/Name` with `.`
//!   spelled `___`.
//! * `hf://Org/Name`: the local Hugging Face cache only (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
//!   `~/.cache/huggingface/hub`), `datasets--Org--Name/snapshots/<rev>` (`refs/main`, else the
//!   first snapshot).
//! * A bare `Org/Name` that is not a local path is tried as a ModelScope, then HF, cache id.
//!
//! In a directory the data file is chosen for the requested split (default `train`) and subset:
//! files named after the split (`train.jsonl`, `train-00000-of-00001.json`, `train/…`) first,
//! then any `.jsonl`, `.json`, `.csv` file, in sorted order. Formats: `.json` (a list of
//! objects), `.jsonl` (one object per line) and `.csv` (a header row, values as strings).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::hub::HubEnv;
use crate::protocol::twinkle::TwinkleError;

/// Env var: the root of local datasets (relative ids resolve against it and must stay inside).
pub const DATA_DIR_ENV: &str = "TWINKLE_DATA_DIR";

/// Data file extensions this server reads.
const EXTS: [&str; 3] = ["jsonl", "json", "csv"];
/// JSON files in dataset repos that hold metadata, not rows.
const META_FILES: [&str; 4] =
    ["dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"];

/// The application's data root: `$TWINKLE_DATA_DIR`, else the working directory.
pub fn data_root() -> Option<PathBuf> {
    std::env::var_os(DATA_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
}

/// Resolves `dataset_id` to a local data file with the process's hub caches. Local paths must
/// stay inside `root` ([`data_root`] in the application) and never inside the checkpoint tree or
/// `$TWINKLE_HOME`, whose JSON files belong to other tenants and to the operator.
pub fn locate(
    dataset_id: &str,
    subset: Option<&str>,
    split: Option<&str>,
    root: Option<&Path>,
) -> Result<PathBuf, TwinkleError> {
    let path = locate_with(dataset_id, subset, split, &HubEnv::from_process(), root)?;
    let real = path.canonicalize().unwrap_or_else(|_| path.clone());
    for private in
        [crate::apps::server::default_save_root(), crate::head::state_file::twinkle_home()]
    {
        let private = private.canonicalize().unwrap_or(private);
        if real.starts_with(&private) {
            return Err(TwinkleError::bad(format!(
                "dataset `{dataset_id}` is inside the server's private directory {}",
                private.display()
            )));
        }
    }
    Ok(path)
}

/// Resolves `dataset_id` against the hub caches of `env` and the data root `root`.
pub fn locate_with(
    dataset_id: &str,
    subset: Option<&str>,
    split: Option<&str>,
    env: &HubEnv,
    root: Option<&Path>,
) -> Result<PathBuf, TwinkleError> {
    let id = dataset_id.trim();
    let split = split.filter(|s| !s.is_empty()).unwrap_or("train");
    let subset = subset.filter(|s| !s.is_empty() && *s != "default");
    let hub = |org: &str, name: &str, ms: bool, hf: bool| -> Result<PathBuf, TwinkleError> {
        let mut looked = Vec::new();
        if ms {
            let mut names = vec![name.to_string()];
            if name.contains('.') {
                names.push(name.replace('.', "___"));
            }
            for root in env.modelscope_roots() {
                for n in &names {
                    looked.push(root.join("datasets").join(org).join(n));
                }
            }
        }
        if hf {
            for root in env.hf_roots() {
                let repo = root.join(format!("datasets--{org}--{name}"));
                let snaps = repo.join("snapshots");
                if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
                    looked.push(snaps.join(rev.trim()));
                }
                let mut all: Vec<PathBuf> = std::fs::read_dir(&snaps)
                    .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                    .unwrap_or_default();
                all.sort();
                if all.is_empty() {
                    looked.push(snaps);
                }
                looked.extend(all);
            }
        }
        for dir in &looked {
            if dir.is_dir()
                && let Some(f) = pick_file(dir, subset, split)?
            {
                return Ok(f);
            }
        }
        Err(TwinkleError::bad(format!(
            "dataset `{id}` is not in the local cache (this server never downloads); looked for \
             .jsonl/.json/.csv files of split `{split}` in:\n  {}\nput the data there or pass a \
             local path",
            looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n  ")
        )))
    };
    let parts = |repo: &str| -> Option<(String, String)> {
        let (org, name) = repo.split_once('/')?;
        (!org.is_empty() && !name.is_empty() && !name.contains('/'))
            .then(|| (org.to_string(), name.to_string()))
    };
    if let Some(repo) = id.strip_prefix("ms://") {
        let (o, n) = parts(repo).ok_or_else(|| bad_id(id))?;
        return hub(&o, &n, true, false);
    }
    if let Some(repo) = id.strip_prefix("hf://") {
        let (o, n) = parts(repo).ok_or_else(|| bad_id(id))?;
        return hub(&o, &n, false, true);
    }
    if id.is_empty() || id.contains("://") {
        return Err(bad_id(id));
    }
    let base = match root {
        Some(r) => r.to_path_buf(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    let local = base.join(id);
    if local.exists() {
        let real = local.canonicalize().map_err(|e| {
            TwinkleError::bad(format!("dataset `{id}`: cannot open {}: {e}", local.display()))
        })?;
        if let Some(r) = root {
            let r = r.canonicalize().unwrap_or_else(|_| r.to_path_buf());
            if !real.starts_with(&r) {
                return Err(TwinkleError::bad(format!(
                    "dataset `{id}` is outside {DATA_DIR_ENV} ({})",
                    r.display()
                )));
            }
        }
        if real.is_dir() {
            return pick_file(&real, subset, split)?.ok_or_else(|| {
                TwinkleError::bad(format!(
                    "dataset `{id}`: {} holds no .jsonl/.json/.csv file",
                    real.display()
                ))
            });
        }
        return Ok(real);
    }
    if !Path::new(id).is_absolute()
        && let Some((o, n)) = parts(id)
    {
        return hub(&o, &n, true, true).map_err(|e| {
            TwinkleError::bad(format!("{e}\n(and no local path {} exists)", local.display()))
        });
    }
    Err(TwinkleError::bad(format!(
        "dataset `{id}`: no such file {} (relative ids resolve against {DATA_DIR_ENV} or the \
         server's working directory)",
        local.display()
    )))
}

fn bad_id(id: &str) -> TwinkleError {
    TwinkleError::bad(format!(
        "dataset_id `{id}` is not supported: use a local .json/.jsonl/.csv path, ms://Org/Name or \
         hf://Org/Name (local cache only)"
    ))
}

fn ext_of(p: &Path) -> Option<&str> {
    p.extension().and_then(|e| e.to_str()).filter(|e| EXTS.contains(e))
}

/// Data files under `dir` (three levels deep, hidden entries skipped), sorted.
fn data_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            if depth > 0 {
                data_files(&p, depth - 1, out);
            }
        } else if ext_of(&p).is_some() && !META_FILES.contains(&name.as_str()) {
            out.push(p);
        }
    }
}

/// The data file of `split` (and `subset`) in `dir`, if any.
pub fn pick_file(
    dir: &Path,
    subset: Option<&str>,
    split: &str,
) -> Result<Option<PathBuf>, TwinkleError> {
    let mut files = Vec::new();
    data_files(dir, 3, &mut files);
    files.sort();
    let rel = |p: &PathBuf| p.strip_prefix(dir).unwrap_or(p).to_string_lossy().into_owned();
    let in_subset =
        |p: &PathBuf| subset.is_none_or(|s| rel(p).split('/').any(|c| c.starts_with(s)));
    let of_split = |p: &PathBuf| {
        let r = rel(p);
        let stem = Path::new(&r).file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
        stem == split
            || stem.starts_with(&format!("{split}-"))
            || stem.starts_with(&format!("{split}_"))
            || r.split('/').rev().skip(1).any(|c| c == split)
    };
    let rank = |p: &PathBuf| match ext_of(p) {
        Some("jsonl") => 0,
        Some("json") => 1,
        _ => 2,
    };
    let mut best: Vec<&PathBuf> = files.iter().filter(|p| in_subset(p) && of_split(p)).collect();
    if best.is_empty() {
        best = files.iter().filter(|p| in_subset(p)).collect();
    }
    best.sort_by_key(|p| rank(p));
    if best.is_empty() {
        let mut other = Vec::new();
        if let Ok(d) = std::fs::read_dir(dir) {
            other.extend(d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
        if other.iter().any(|n| n.ends_with(".parquet") || n == "data") {
            return Err(TwinkleError::bad(format!(
                "{} holds no .jsonl/.json/.csv data file (parquet and arrow are not read by this \
                 server; convert to JSON lines)",
                dir.display()
            )));
        }
        return Ok(None);
    }
    Ok(best.first().map(|p| (*p).clone()))
}

/// Largest data file read (the rows are held in memory).
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// Reads the rows of `path` (at most `max_rows`; more is a 400).
pub fn read_rows(path: &Path, max_rows: usize) -> Result<Vec<Value>, TwinkleError> {
    let size = std::fs::metadata(path)
        .map_err(|e| TwinkleError::bad(format!("cannot read {}: {e}", path.display())))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(TwinkleError::bad(format!(
            "dataset file {} is {size} bytes; this server reads files up to {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TwinkleError::bad(format!("cannot read {}: {e}", path.display())))?;
    let rows = match ext_of(path) {
        Some("csv") => parse_csv(&text, max_rows),
        Some("json") => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(items)) => {
                if items.len() > max_rows {
                    Err(too_many(max_rows))
                } else {
                    Ok(items)
                }
            }
            Ok(_) => Err("a .json dataset must hold a list of objects".to_string()),
            // Some hubs store JSON lines under `.json`.
            Err(_) => parse_jsonl(&text, max_rows),
        },
        _ => parse_jsonl(&text, max_rows),
    }
    .map_err(|e| TwinkleError::bad(format!("dataset file {}: {e}", path.display())))?;
    for (i, r) in rows.iter().enumerate() {
        if !r.is_object() {
            return Err(TwinkleError::bad(format!(
                "dataset file {}: row {i} is not an object",
                path.display()
            )));
        }
    }
    Ok(rows)
}

fn too_many(max: usize) -> String {
    format!(
        "more than {max} rows (this server's per-dataset limit; use data_slice or a smaller file)"
    )
}

fn parse_jsonl(text: &str, max_rows: usize) -> Result<Vec<Value>, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if rows.len() == max_rows {
            return Err(too_many(max_rows));
        }
        rows.push(serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    Ok(rows)
}

/// RFC 4180 CSV: a header row, `"`-quoted fields with `""` escapes and embedded newlines.
pub fn parse_csv(text: &str, max_rows: usize) -> Result<Vec<Value>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' => {
                record.push(std::mem::take(&mut field));
                if !(record.len() == 1 && record[0].is_empty()) {
                    records.push(std::mem::take(&mut record));
                    if records.len() > max_rows + 1 {
                        return Err(too_many(max_rows));
                    }
                }
                record.clear();
                any = false;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if any {
        record.push(field);
        records.push(record);
    }
    let mut it = records.into_iter();
    let header = it.next().ok_or("empty CSV (no header row)")?;
    let mut rows = Vec::new();
    for (n, rec) in it.enumerate() {
        if rec.len() != header.len() {
            return Err(format!(
                "record {} has {} fields, the header has {}",
                n + 1,
                rec.len(),
                header.len()
            ));
        }
        if rows.len() == max_rows {
            return Err(too_many(max_rows));
        }
        let obj: Map<String, Value> =
            header.iter().cloned().zip(rec.into_iter().map(Value::String)).collect();
        rows.push(Value::Object(obj));
    }
    Ok(rows)
}
