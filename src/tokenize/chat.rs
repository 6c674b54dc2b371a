//! Hugging Face chat templates rendered with minijinja, configured like transformers' Jinja
//! environment (trim_blocks, lstrip_blocks, loop controls, Python string methods, its `tojson`).

use std::collections::BTreeMap;
use std::io;

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat";

/// One conversation turn. Templates may read more fields (tool calls, reasoning); pass those
/// through [`super::Tokenizer::apply_chat_template_json`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Compiles `source`; the error text carries minijinja's line information.
    pub(crate) fn compile(source: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| format!("{e:#}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(|e| format!("{e:#}"))?;
        Ok(Self { env })
    }

    /// Renders with `context` as the template's globals.
    pub(crate) fn render(&self, context: BTreeMap<String, Value>) -> Result<String, String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| format!("{e:#}"))?;
        template.render(context).map_err(|e| format!("{e:#}"))
    }
}

/// Converts anything serialisable into a template value.
pub(crate) fn to_value<T: Serialize + ?Sized>(value: &T) -> Value {
    Value::from(Serde(value))
}

/// Templates call `raise_exception("...")` to reject a conversation they cannot format.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the chat template rejected the input: {message}"),
    ))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, i.e. Python's
/// separators `", "` and `": "` when compact. minijinja's own filter is compact and HTML-escapes,
/// which would change the prompt text models were trained on.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::BadSerialization, format!("tojson cannot serialise this value: {e}"))
    })?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            json.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonCompact);
            json.serialize(&mut ser)
        }
    };
    written.map_err(|e| Error::new(ErrorKind::BadSerialization, format!("tojson failed: {e}")))?;
    let text = String::from_utf8(out).map_err(|e| {
        Error::new(ErrorKind::BadSerialization, format!("tojson produced invalid UTF-8: {e}"))
    })?;
    Ok(Value::from_safe_string(text))
}

/// serde_json formatter with Python's default `json.dumps` separators.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    /// Members are separated as elements are.
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}
