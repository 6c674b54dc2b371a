//! Hand-written deserializers for the lenient spots of the seed format, and the rewrite of
//! serde's stock error texts into the messages `check-config` prints.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};

use super::schema::{DeviceType, Ranks, SupportedModel};

/// A key whose value may be written as nothing (`args:`): null means the default.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `http_options.port`: an integer in 1..=65535.
pub(crate) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct PortVisitor;
    const EXPECTED: &str = "a port number between 1 and 65535";
    impl Visitor<'_> for PortVisitor {
        type Value = u16;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(EXPECTED)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
            match u16::try_from(v) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(E::invalid_value(Unexpected::Signed(v), &EXPECTED)),
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
            match u16::try_from(v) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(E::invalid_value(Unexpected::Unsigned(v), &EXPECTED)),
            }
        }
    }
    d.deserialize_any(PortVisitor)
}

/// Text of a YAML scalar exactly as written (env var values may be written as numbers or
/// booleans: `TWINKLE_FAIL_FAST: 0`; `1.10` stays `1.10`, `yes` stays `yes`). serde_norway's
/// `deserialize_str` hands over the source text of any scalar; the other visits are fallbacks.
struct ScalarText;

impl Visitor<'_> for ScalarText {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number or boolean")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

struct ScalarString(String);

impl<'de> Deserialize<'de> for ScalarString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ScalarText).map(ScalarString)
    }
}

/// A `NAME: value` map whose values are scalars kept as text; null means empty.
pub(crate) fn env_vars<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct EnvVisitor;
    impl<'de> Visitor<'de> for EnvVisitor {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping of names to values")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(ScalarString(key)) = map.next_key()? {
                let ScalarString(value) = map.next_value()?;
                // Duplicate keys never get here: the syntax pass rejects them.
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_any(EnvVisitor)
}

impl<'de> Deserialize<'de> for DeviceType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checked inside the visitor so the error carries the scalar's own position.
        struct TypeVisitor;
        const EXPECTED: &str = "one of cuda, gpu, CPU";
        impl Visitor<'_> for TypeVisitor {
            type Value = DeviceType;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DeviceType, E> {
                match s.to_ascii_lowercase().as_str() {
                    "cuda" | "gpu" => Ok(DeviceType::Cuda),
                    "cpu" => Ok(DeviceType::Cpu),
                    _ => Err(E::invalid_value(Unexpected::Str(s), &EXPECTED)),
                }
            }
        }
        d.deserialize_str(TypeVisitor)
    }
}

impl<'de> Deserialize<'de> for Ranks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RanksVisitor;
        impl<'de> Visitor<'de> for RanksVisitor {
            type Value = Ranks;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ranks, E> {
                u32::try_from(v)
                    .map(Ranks::Count)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &"a non-negative integer"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ranks, E> {
                u32::try_from(v).map(Ranks::Count).map_err(|_| {
                    E::invalid_value(Unexpected::Unsigned(v), &"an integer below 2^32")
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ranks, A::Error> {
                let mut out = Vec::new();
                while let Some(r) = seq.next_element::<u32>()? {
                    out.push(r);
                }
                Ok(Ranks::List(out))
            }
        }
        d.deserialize_any(RanksVisitor)
    }
}

impl<'de> Deserialize<'de> for SupportedModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModelVisitor;
        impl<'de> Visitor<'de> for ModelVisitor {
            type Value = SupportedModel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a model name or {model_name: NAME}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SupportedModel, E> {
                Ok(SupportedModel::Name(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SupportedModel, A::Error> {
                let mut name = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "model_name" {
                        return Err(de::Error::unknown_field(&key, &["model_name"]));
                    }
                    if name.is_some() {
                        return Err(de::Error::duplicate_field("model_name"));
                    }
                    name = Some(map.next_value::<String>()?);
                }
                name.map(|model_name| SupportedModel::Entry { model_name })
                    .ok_or_else(|| de::Error::missing_field("model_name"))
            }
        }
        d.deserialize_any(ModelVisitor)
    }
}

/// Rewrites serde's stock messages ("invalid type: string \"two\", expected u32") into the
/// style check-config prints ("expected an integer, got \"two\""); other texts pass unchanged.
pub(crate) fn humanize(msg: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix)
            && let Some(at) = rest.rfind(", expected ")
        {
            let (got, expected) = (&rest[..at], &rest[at + ", expected ".len()..]);
            return format!("expected {}, got {}", expected_text(expected, got), got_text(got));
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let allowed = backticked(&rest[end + 1..]);
        return if allowed.is_empty() {
            "unknown key (no keys are allowed here)".to_string()
        } else {
            format!("unknown key (allowed keys: {})", allowed.join(", "))
        };
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `")
        && let Some(end) = rest.find('`')
    {
        let allowed = backticked(&rest[end + 1..]);
        return format!(
            "unknown value \"{}\", expected one of: {}",
            &rest[..end],
            allowed.join(", ")
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        return format!("missing required key \"{}\"", rest.trim_end_matches('`'));
    }
    if let Some(rest) = msg.strip_prefix("duplicate field `") {
        return format!("key \"{}\" is given twice", rest.trim_end_matches('`'));
    }
    msg.to_string()
}

/// The names between backticks in "…, expected one of `a`, `b`".
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

fn expected_text(expected: &str, got: &str) -> String {
    // A non-negative integer that an unsigned type rejects can only be too large.
    let too_large = got.starts_with("integer `") && !got.starts_with("integer `-");
    let text = match expected {
        "u8" if too_large => "an integer no larger than 255",
        "u16" if too_large => "an integer no larger than 65535",
        "u32" if too_large => "an integer no larger than 4294967295",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer",
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a map" => "a mapping",
        "a sequence" => "a list",
        "a string" | "a borrowed string" | "char" => "a string",
        other if other.starts_with("struct ") => "a mapping",
        other if other.starts_with("enum ") => "one of the listed values",
        other => other,
    };
    text.to_string()
}

fn got_text(got: &str) -> String {
    let inner = |p: &str| got.strip_prefix(p).map(|r| r.trim_matches('`').to_string());
    if let Some(s) = got.strip_prefix("string ") {
        return s.to_string();
    }
    for p in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = inner(p) {
            return v;
        }
    }
    match got {
        "unit value" => "an empty value".to_string(),
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::humanize;

    #[test]
    fn rewrites_stock_messages() {
        assert_eq!(
            humanize("invalid type: string \"two\", expected an integer"),
            "expected an integer, got \"two\""
        );
        assert_eq!(
            humanize("invalid value: integer `-3`, expected u32"),
            "expected a non-negative integer, got -3"
        );
        assert_eq!(humanize("invalid type: map, expected f64"), "expected a number, got a mapping");
        assert_eq!(
            humanize("invalid type: floating point `1.5`, expected u32"),
            "expected a non-negative integer, got 1.5"
        );
        assert_eq!(
            humanize("invalid value: integer `5000000000`, expected u32"),
            "expected an integer no larger than 4294967295, got 5000000000"
        );
        assert_eq!(humanize("missing field `name`"), "missing required key \"name\"");
        assert_eq!(
            humanize("unknown field `foo`, expected one of `a`, `b`"),
            "unknown key (allowed keys: a, b)"
        );
        assert_eq!(
            humanize("unknown variant `x`, expected one of `server`, `model`"),
            "unknown value \"x\", expected one of: server, model"
        );
        assert_eq!(humanize("something else"), "something else");
    }
}
