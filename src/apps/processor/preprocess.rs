//! Built-in row preprocessors (`Dataset.map`) and filters (`Dataset.filter`), chosen by name from
//! a fixed list; nothing is ever executed from a name.
//!
//! Preprocessors (ported from `twinkle.preprocessor.llm`):
//! * `SelfCognitionProcessor(model_name, model_author)`: a `{query, response}` row (the
//!   `swift/self-cognition` format, extra fields such as `tag` are dropped) becomes
//!   `messages = [system "You are a helpful assistant.", user query, assistant response]` with
//!   `{{NAME}}` / `{{AUTHOR}}` replaced (defaults `twinkle robot` / `twinkle lab`, as upstream);
//!   a row that already has `messages` gets the substitution in every message's content.
//! * `AlpacaProcessor`: `{instruction, input?, output}` → `[user "instruction\ninput", assistant
//!   output]`.
//! * `MessagesProcessor` (also `MessagesPreprocessor`, `Trajectory`): rows that already carry
//!   `messages` pass through (checked).
//!
//! Filters: `LengthFilter` (also `MaxLengthFilter`): drops rows whose encoding is longer than
//! `init_args.max_length` (default: the template's `max_length`). It needs `set_template` or
//! encoded rows.

use serde_json::{Map, Value, json};

use crate::protocol::twinkle::TwinkleError;

/// The names `map` accepts.
pub const PREPROCESSORS: [&str; 5] = [
    "SelfCognitionProcessor",
    "AlpacaProcessor",
    "MessagesProcessor",
    "MessagesPreprocessor",
    "Trajectory",
];

/// The names `filter` accepts.
pub const FILTERS: [&str; 2] = ["LengthFilter", "MaxLengthFilter"];

/// A built-in row mapper.
#[derive(Debug, Clone, PartialEq)]
pub enum Preprocessor {
    SelfCognition { name: String, author: String },
    Alpaca,
    Messages,
}

fn init_str(init: &Map<String, Value>, key: &str) -> Result<Option<String>, TwinkleError> {
    match init.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => {
            Err(TwinkleError::bad(format!("init_args.{key} must be a string, got {other}")))
        }
    }
}

impl Preprocessor {
    /// The preprocessor `name` with its `init_args`.
    pub fn by_name(name: &str, init: &Map<String, Value>) -> Result<Self, TwinkleError> {
        let p = match name {
            "SelfCognitionProcessor" => Preprocessor::SelfCognition {
                name: init_str(init, "model_name")?.unwrap_or_else(|| "twinkle robot".into()),
                author: init_str(init, "model_author")?.unwrap_or_else(|| "twinkle lab".into()),
            },
            "AlpacaProcessor" => Preprocessor::Alpaca,
            "MessagesProcessor" | "MessagesPreprocessor" | "Trajectory" => Preprocessor::Messages,
            other => {
                return Err(TwinkleError::bad(format!(
                    "preprocess_func `{}` is not available on this server; available: {}",
                    other.chars().take(200).collect::<String>(),
                    PREPROCESSORS.join(", ")
                )));
            }
        };
        Ok(p)
    }

    /// Maps row `i`.
    pub fn apply(&self, i: usize, row: &Value) -> Result<Value, TwinkleError> {
        let field = |k: &str| row.get(k).and_then(Value::as_str);
        let text = |k: &str| -> String {
            match row.get(k) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            }
        };
        match self {
            Preprocessor::SelfCognition { name, author } => {
                let sub = |s: &str| s.replace("{{NAME}}", name).replace("{{AUTHOR}}", author);
                if let Some(msgs) = row.get("messages").and_then(Value::as_array) {
                    let msgs = checked_messages(i, msgs)?
                        .into_iter()
                        .map(|mut m| {
                            if let Some(Value::String(c)) = m.get_mut("content") {
                                *c = sub(c);
                            }
                            m
                        })
                        .collect::<Vec<_>>();
                    return Ok(json!({ "messages": msgs }));
                }
                let (Some(q), Some(r)) = (field("query"), field("response")) else {
                    return Err(TwinkleError::bad(format!(
                        "SelfCognitionProcessor: row {i} needs string fields `query` and \
                         `response` (or `messages`); it has {}",
                        keys(row)
                    )));
                };
                Ok(json!({"messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": sub(q)},
                    {"role": "assistant", "content": sub(r)},
                ]}))
            }
            Preprocessor::Alpaca => {
                if row.get("instruction").is_none() && row.get("output").is_none() {
                    return Err(TwinkleError::bad(format!(
                        "AlpacaProcessor: row {i} needs `instruction` and `output` (and \
                         optionally `input`); it has {}",
                        keys(row)
                    )));
                }
                let (ins, inp) = (text("instruction"), text("input"));
                let prompt = if inp.is_empty() { ins } else { format!("{ins}\n{inp}") };
                Ok(json!({"messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": text("output")},
                ]}))
            }
            Preprocessor::Messages => {
                let Some(msgs) = row.get("messages").and_then(Value::as_array) else {
                    return Err(TwinkleError::bad(format!(
                        "MessagesProcessor: row {i} has no `messages` list; it has {}",
                        keys(row)
                    )));
                };
                checked_messages(i, msgs)?;
                Ok(row.clone())
            }
        }
    }
}

fn keys(row: &Value) -> String {
    match row.as_object() {
        Some(o) if !o.is_empty() => o.keys().map(String::as_str).collect::<Vec<_>>().join(", "),
        _ => "no fields".into(),
    }
}

/// Checks that every message is `{role: str, content, …}`.
pub fn checked_messages(i: usize, msgs: &[Value]) -> Result<Vec<Value>, TwinkleError> {
    for (k, m) in msgs.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(TwinkleError::bad(format!(
                "row {i}: messages[{k}] must be an object with a string `role`"
            )));
        }
    }
    Ok(msgs.to_vec())
}

/// A built-in row filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Keep rows whose token count is at most this (`None`: the template's max_length).
    MaxLength(Option<usize>),
}

impl Filter {
    pub fn by_name(name: &str, init: &Map<String, Value>) -> Result<Self, TwinkleError> {
        match name {
            "LengthFilter" | "MaxLengthFilter" => {
                let max = match init.get("max_length") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().filter(|&m| m > 0).ok_or_else(|| {
                        TwinkleError::bad(format!(
                            "init_args.max_length must be a positive integer, got {v}"
                        ))
                    })? as usize),
                };
                Ok(Filter::MaxLength(max))
            }
            other => Err(TwinkleError::bad(format!(
                "filter_func `{}` is not available on this server; available: {}",
                other.chars().take(200).collect::<String>(),
                FILTERS.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_cognition_substitutes_name_and_author() {
        let init = json!({"model_name": "Twinkly", "model_author": "ModelScope"});
        let p = Preprocessor::by_name("SelfCognitionProcessor", init.as_object().unwrap()).unwrap();
        let row = json!({"query": "Who are you?", "response": "I am {{NAME}}, made by {{AUTHOR}}.", "tag": "zh"});
        let out = p.apply(0, &row).unwrap();
        assert_eq!(out["messages"][1], json!({"role": "user", "content": "Who are you?"}));
        assert_eq!(
            out["messages"][2],
            json!({"role": "assistant", "content": "I am Twinkly, made by ModelScope."})
        );
        assert_eq!(out["messages"][0]["role"], "system");
        let msgs = json!({"messages": [{"role": "user", "content": "{{NAME}}?"}]});
        assert_eq!(p.apply(1, &msgs).unwrap()["messages"][0]["content"], "Twinkly?");
        let err = p.apply(2, &json!({"q": 1})).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("query"), "{err}");
        let d = Preprocessor::by_name("SelfCognitionProcessor", &Map::new()).unwrap();
        let out = d.apply(0, &json!({"query": "{{NAME}}", "response": "{{AUTHOR}}"})).unwrap();
        assert_eq!(out["messages"][1]["content"], "twinkle robot");
        assert_eq!(out["messages"][2]["content"], "twinkle lab");
    }

    #[test]
    fn alpaca_and_passthrough_and_unknown_names() {
        let a = Preprocessor::by_name("AlpacaProcessor", &Map::new()).unwrap();
        let out =
            a.apply(0, &json!({"instruction": "Add", "input": "1+1", "output": "2"})).unwrap();
        assert_eq!(out["messages"][0]["content"], "Add\n1+1");
        assert_eq!(out["messages"][1], json!({"role": "assistant", "content": "2"}));
        let out = a.apply(0, &json!({"instruction": "Hi", "output": "Hello"})).unwrap();
        assert_eq!(out["messages"][0]["content"], "Hi");
        let m = Preprocessor::by_name("MessagesProcessor", &Map::new()).unwrap();
        assert!(m.apply(0, &json!({"messages": [{"content": "x"}]})).is_err());
        let e = Preprocessor::by_name("os.system", &Map::new()).unwrap_err().to_string();
        assert!(e.contains("not available") && e.contains("SelfCognitionProcessor"), "{e}");
        assert!(Filter::by_name("Nope", &Map::new()).is_err());
        let f = Filter::by_name("LengthFilter", json!({"max_length": 7}).as_object().unwrap());
        assert_eq!(f.unwrap(), Filter::MaxLength(Some(7)));
    }
}
