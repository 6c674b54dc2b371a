//! `dataset.Dataset`: rows held in memory, loaded from a local file (see [`super::data`]) or
//! given inline in `DatasetMeta.data` (a list of rows or a dict of columns), with
//! the methods the clients call: `set_template`, `map`, `filter`, `encode`, `__len__`,
//! `__getitem__`. Encoding adds the InputFeature fields `input_ids`, `labels` (rolled, -100
//! ignored; absent with `add_generation_prompt`), `attention_mask`, `position_ids` and `length` to
//! each row, as upstream's template does; the clients pass the rows straight to
//! `model.forward_backward`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use super::data;
use super::kwargs::{opt_bool, opt_str, opt_u64};
use super::preprocess::{Filter, Preprocessor, checked_messages};
use crate::protocol::twinkle::TwinkleError;
use crate::protocol::twinkle::wire::{DataSlice, dataset_meta, decode_typed};
use crate::tokenize::Tokenizer;
use crate::tokenize::trajectory::RenderOptions;

/// Loaded tokenizers by model directory (loading one costs ~100 ms; datasets share them).
#[derive(Default)]
pub struct Tokenizers(Mutex<HashMap<PathBuf, Arc<Tokenizer>>>);

impl Tokenizers {
    /// The tokenizer (with chat template) of `model_id`, resolved locally by [`crate::hub`].
    pub fn get(&self, model_id: &str) -> Result<Arc<Tokenizer>, TwinkleError> {
        let dir = crate::hub::resolve(model_id)
            .map_err(|e| TwinkleError::bad(format!("set_template: model_id: {e}")))?;
        if let Some(t) = self.0.lock().map_err(|_| poisoned())?.get(&dir) {
            return Ok(t.clone());
        }
        let tok = Tokenizer::from_dir(&dir).map_err(|e| {
            TwinkleError::bad(format!(
                "set_template: model `{model_id}` has no usable tokenizer: {e}"
            ))
        })?;
        if !tok.has_chat_template() {
            return Err(TwinkleError::bad(format!(
                "set_template: model `{model_id}` has no chat template"
            )));
        }
        let tok = Arc::new(tok);
        self.0.lock().map_err(|_| poisoned())?.insert(dir, tok.clone());
        Ok(tok)
    }
}

pub(crate) fn poisoned() -> TwinkleError {
    TwinkleError::Internal("a processor lock was poisoned by an earlier failure".into())
}

/// A chat template bound to a dataset.
#[derive(Clone)]
pub struct Template {
    pub tokenizer: Arc<Tokenizer>,
    pub opts: RenderOptions,
}

/// A dataset processor.
pub struct Dataset {
    pub dataset_id: String,
    pub rows: Vec<Value>,
    pub template: Option<Template>,
}

/// Whether `name` names a template this server maps onto the model's own chat template.
fn template_name_ok(name: &str) -> bool {
    name == "Template"
        || ((name.starts_with("Qwen") || name.starts_with("Llama"))
            && name.ends_with("Template")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

impl Dataset {
    /// `Dataset(dataset_meta=…)`: loads the rows (at most `max_rows` before slicing).
    pub fn create(
        kw: &Map<String, Value>,
        max_rows: usize,
        data_root: Option<&std::path::Path>,
    ) -> Result<Self, TwinkleError> {
        let meta = kw.get("dataset_meta").filter(|v| !v.is_null()).ok_or_else(|| {
            TwinkleError::bad("dataset.Dataset needs dataset_meta (a DatasetMeta)")
        })?;
        let mut m = decode_typed("dataset_meta", "DatasetMeta", meta)?;
        let inline = m.remove("data").filter(|d| !d.is_null());
        if inline.is_some() && m.get("dataset_id").and_then(Value::as_str).is_none_or(str::is_empty)
        {
            m.insert("dataset_id".into(), json!("<inline data>"));
        }
        let meta = dataset_meta("dataset_meta", &Value::Object(m))?;
        let rows = match inline {
            Some(d) => inline_rows(d, max_rows)?,
            None => {
                let path = data::locate(
                    &meta.dataset_id,
                    meta.subset_name.as_deref(),
                    meta.split.as_deref(),
                    data_root,
                )?;
                tracing::info!(dataset = %meta.dataset_id, file = %path.display(), "loading dataset");
                data::read_rows(&path, max_rows)?
            }
        };
        let rows = match &meta.data_slice {
            None => rows,
            Some(s) => select(rows, s)?,
        };
        tracing::info!(dataset = %meta.dataset_id, rows = rows.len(), "dataset loaded");
        Ok(Dataset { dataset_id: meta.dataset_id, rows, template: None })
    }

    /// Dispatches method `function` with keyword arguments `kw`.
    pub fn call(
        &mut self,
        function: &str,
        kw: &Map<String, Value>,
        tokenizers: &Tokenizers,
    ) -> Result<Value, TwinkleError> {
        match function {
            "set_template" => self.set_template(kw, tokenizers).map(|_| Value::Null),
            "map" => self.map(kw).map(|_| Value::Null),
            "filter" => self.filter(kw).map(|_| Value::Null),
            "encode" => self.encode(kw).map(|_| Value::Null),
            "__len__" => Ok(json!(self.rows.len())),
            "__getitem__" => self.get_item(kw.get("idx").unwrap_or(&Value::Null)),
            "add_dataset" | "mix_dataset" => Err(TwinkleError::bad(format!(
                "Dataset.{function} is not supported on this server: one remote Dataset holds \
                 one data file; create another Dataset (or mix the files before uploading)"
            ))),
            other => Err(TwinkleError::bad(format!(
                "Dataset.{other} is not available on this server; available: set_template, map, \
                 filter, encode, __len__, __getitem__"
            ))),
        }
    }

    fn set_template(
        &mut self,
        kw: &Map<String, Value>,
        toks: &Tokenizers,
    ) -> Result<(), TwinkleError> {
        let name =
            opt_str(kw, "template_func")?.or(opt_str(kw, "template_cls")?).unwrap_or("Template");
        if !template_name_ok(name) {
            return Err(TwinkleError::bad(format!(
                "template `{}` is not available on this server; available: Template, or any \
                 Qwen*/Llama* template name (all use the model's own chat template)",
                name.chars().take(200).collect::<String>()
            )));
        }
        let model_id = opt_str(kw, "model_id")?.ok_or_else(|| {
            TwinkleError::bad("set_template needs model_id (the model whose chat template to use)")
        })?;
        let tokenizer = toks.get(model_id)?;
        let mut extra = Map::new();
        if let Some(v) = kw.get("enable_thinking").filter(|v| !v.is_null()) {
            let b = v.as_bool().ok_or_else(|| {
                TwinkleError::bad(format!("enable_thinking must be a boolean, got {v}"))
            })?;
            extra.insert("enable_thinking".into(), Value::Bool(b));
        }
        let max_length = opt_u64(kw, "max_length")?.map(|n| n as usize).filter(|&m| m > 0);
        self.template = Some(Template { tokenizer, opts: RenderOptions { extra, max_length } });
        Ok(())
    }

    fn map(&mut self, kw: &Map<String, Value>) -> Result<(), TwinkleError> {
        if kw.get("dataset_meta").is_some_and(|v| !v.is_null()) {
            return Err(TwinkleError::bad(
                "map(dataset_meta=…) is not supported: a remote Dataset holds one data file",
            ));
        }
        let name = opt_str(kw, "preprocess_func")?
            .ok_or_else(|| TwinkleError::bad("map needs preprocess_func (a built-in name)"))?;
        let init = init_args(kw)?;
        let p = Preprocessor::by_name(name, &init)?;
        let rows =
            self.rows.iter().enumerate().map(|(i, r)| p.apply(i, r)).collect::<Result<_, _>>()?;
        self.rows = rows;
        Ok(())
    }

    fn filter(&mut self, kw: &Map<String, Value>) -> Result<(), TwinkleError> {
        let name = opt_str(kw, "filter_func")?
            .ok_or_else(|| TwinkleError::bad("filter needs filter_func (a built-in name)"))?;
        let Filter::MaxLength(max) = Filter::by_name(name, &init_args(kw)?)?;
        let max =
            max.or(self.template.as_ref().and_then(|t| t.opts.max_length)).ok_or_else(|| {
                TwinkleError::bad(format!(
                    "{name} needs init_args.max_length or a template with max_length"
                ))
            })?;
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, row) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            let n = match row.get("input_ids").and_then(Value::as_array) {
                Some(ids) => ids.len(),
                None => {
                    let t = self.template.as_ref().ok_or_else(|| {
                        TwinkleError::bad(format!(
                            "{name} needs set_template first (or encoded rows)"
                        ))
                    })?;
                    let opts = RenderOptions { max_length: None, ..t.opts.clone() };
                    t.tokenizer
                        .encode_for_training(messages_of(i, &row)?, &opts)
                        .map_err(|e| TwinkleError::bad(format!("row {i}: {e}")))?
                        .input_ids
                        .len()
                }
            };
            if n <= max {
                keep.push(row);
            }
        }
        self.rows = keep;
        Ok(())
    }

    fn encode(&mut self, kw: &Map<String, Value>) -> Result<(), TwinkleError> {
        let t = self.template.clone().ok_or_else(|| {
            TwinkleError::bad("encode needs a template: call set_template(…, model_id=…) first")
        })?;
        let generation = opt_bool(kw, "add_generation_prompt")?;
        let mut out = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter().enumerate() {
            if row.get("input_ids").is_some() {
                out.push(row.clone());
                continue;
            }
            let msgs = messages_of(i, row)?;
            let err = |e: crate::tokenize::TokenizeError| {
                TwinkleError::bad(format!("encode: row {i}: {e}"))
            };
            let (ids, labels) = if generation {
                (t.tokenizer.encode_prompt(msgs, &t.opts).map_err(err)?, None)
            } else {
                let e = t.tokenizer.encode_for_training(msgs, &t.opts).map_err(err)?;
                (e.input_ids, Some(e.labels))
            };
            if ids.is_empty() {
                continue; // upstream drops rows that encode to nothing
            }
            // The other columns stay (as `datasets.map` keeps them upstream); the model routes
            // read an object with `input_ids` as an InputFeature.
            let mut feature = row.as_object().cloned().unwrap_or_default();
            let n = ids.len();
            feature.insert("input_ids".into(), json!(ids));
            if let Some(l) = labels {
                feature.insert("labels".into(), json!(l));
            }
            feature.insert("attention_mask".into(), json!(vec![1; n]));
            feature.insert("position_ids".into(), json!((0..n).collect::<Vec<_>>()));
            feature.insert("length".into(), json!(n));
            out.push(Value::Object(feature));
        }
        self.rows = out;
        Ok(())
    }

    fn get_item(&self, idx: &Value) -> Result<Value, TwinkleError> {
        let n = self.rows.len();
        if let Some(i) = idx.as_i64() {
            let at = if i < 0 { i + n as i64 } else { i };
            return usize::try_from(at).ok().and_then(|a| self.rows.get(a)).cloned().ok_or_else(
                || TwinkleError::bad(format!("__getitem__: index {i} is out of range ({n} rows)")),
            );
        }
        if let Some(o) = idx.as_object() {
            let num = |k: &str| o.get(k).and_then(Value::as_u64).map(|v| v as usize);
            let s = DataSlice::Range {
                start: num("start").unwrap_or(0),
                stop: num("stop"),
                step: num("step").unwrap_or(1),
            };
            let rows =
                s.indices(n)?.into_iter().filter_map(|i| self.rows.get(i).cloned()).collect();
            return Ok(Value::Array(rows));
        }
        Err(TwinkleError::bad(format!(
            "__getitem__: idx must be an integer or a range {{start, stop, step}}, got {idx}"
        )))
    }
}

fn init_args(kw: &Map<String, Value>) -> Result<Map<String, Value>, TwinkleError> {
    match kw.get("init_args") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o.clone()),
        Some(v) => Err(TwinkleError::bad(format!("init_args must be an object, got {v}"))),
    }
}

fn messages_of(i: usize, row: &Value) -> Result<&[Value], TwinkleError> {
    let msgs = row.get("messages").and_then(Value::as_array).ok_or_else(|| {
        TwinkleError::bad(format!(
            "row {i} has no `messages`: map it first (e.g. map('SelfCognitionProcessor') or \
             map('AlpacaProcessor'))"
        ))
    })?;
    checked_messages(i, msgs)?;
    Ok(msgs)
}

/// `DatasetMeta.data`: rows given inline, as a list of objects or a dict of equal-length columns.
fn inline_rows(data: Value, max_rows: usize) -> Result<Vec<Value>, TwinkleError> {
    let bad = |m: String| TwinkleError::bad(format!("dataset_meta.data: {m}"));
    let rows = match data {
        Value::Array(rows) => rows,
        Value::Object(cols) => {
            let mut n = None;
            for (k, v) in &cols {
                let len = v.as_array().map(Vec::len).ok_or_else(|| {
                    bad(format!("column `{k}` is not a list (expected a dict of columns)"))
                })?;
                if n.is_some_and(|n| n != len) {
                    return Err(bad("columns have different lengths".into()));
                }
                n = Some(len);
            }
            (0..n.unwrap_or(0))
                .map(|i| {
                    Value::Object(cols.iter().map(|(k, v)| (k.clone(), v[i].clone())).collect())
                })
                .collect()
        }
        other => {
            return Err(bad(format!(
                "expected a list of rows or a dict of columns, got {}",
                other.to_string().chars().take(100).collect::<String>()
            )));
        }
    };
    if rows.len() > max_rows {
        return Err(bad(format!("{} rows exceed this server's limit of {max_rows}", rows.len())));
    }
    if let Some(i) = rows.iter().position(|r| !r.is_object()) {
        return Err(bad(format!("row {i} is not an object")));
    }
    Ok(rows)
}

fn select(rows: Vec<Value>, s: &DataSlice) -> Result<Vec<Value>, TwinkleError> {
    let idx = s.indices(rows.len())?;
    Ok(idx.into_iter().filter_map(|i| rows.get(i).cloned()).collect())
}
