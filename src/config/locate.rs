//! Key paths (`applications[1].args.device_group.ranks`) and the line each one sits on.
//!
//! serde_norway keeps its event parser private, but it stamps every error raised inside a
//! visitor with the position of the YAML node being read. The locator walks the document along
//! the path with a visitor that raises a marker error on the target node (on the key itself
//! when the path ends in a key), and reads the line off that error. This reuses the real
//! parser, so flow mappings, anchors and quoted keys are located exactly as serde read them.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path from the document root to a key or list item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// The document root.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a mapping key.
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        Self(v)
    }

    /// This path extended by a list index.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
            }
        }
        Ok(())
    }
}

/// Converts serde_path_to_error's path (the root renders as ".") into ours.
pub(crate) fn from_serde_path(p: &serde_path_to_error::Path) -> KeyPath {
    use serde_path_to_error::Segment;
    KeyPath(
        p.iter()
            .map(|s| match s {
                Segment::Seq { index } => Seg::Index(*index),
                Segment::Map { key } | Segment::Enum { variant: key } => Seg::Key(key.clone()),
                Segment::Unknown => Seg::Key("?".to_string()),
            })
            .collect(),
    )
}

/// The 1-based line of `path` in `text`, or of its nearest ancestor present in the text
/// (a defaulted key is reported where its parent is written). `None` only for the root.
pub fn line_of(text: &str, path: &KeyPath) -> Option<usize> {
    let mut segs: &[Seg] = &path.0;
    while !segs.is_empty() {
        if let Some(line) = exact_line(text, segs) {
            return Some(line);
        }
        segs = &segs[..segs.len() - 1];
    }
    None
}

const HIT: &str = "\u{1}twinkle-locator-hit";

fn exact_line(text: &str, segs: &[Seg]) -> Option<usize> {
    let walk = Walk { rest: segs };
    match walk.deserialize(serde_norway::Deserializer::from_str(text)) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(HIT) => e.location().map(|l| l.line()),
        Err(_) => None,
    }
}

/// Follows `rest` from the current node; `Ok(())` means the path is not in the document.
/// As a visitor it is only used with a non-empty `rest` (see its `deserialize`), so
/// `rest[1..]` below is always in bounds.
struct Walk<'p> {
    rest: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.rest.is_empty() { d.deserialize_any(Hit) } else { d.deserialize_any(self) }
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let want = match self.rest.first() {
            Some(Seg::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        let last = self.rest.len() == 1;
        while let Some(matched) = map.next_key_seed(KeySeed { want, hit: last })? {
            if matched {
                map.next_value_seed(Walk { rest: &self.rest[1..] })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let want = match self.rest.first() {
            Some(Seg::Index(i)) => Some(*i),
            _ => None,
        };
        let mut i = 0usize;
        loop {
            let found = if want == Some(i) {
                seq.next_element_seed(Walk { rest: &self.rest[1..] })?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !found {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// Reads a mapping key; `true` when it is the wanted one. With `hit`, the wanted key raises
/// the marker error so the reported position is the key's own.
struct KeySeed<'p> {
    want: Option<&'p str>,
    hit: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl KeySeed<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match self.want {
            Some(w) if w == key && self.hit => Err(E::custom(HIT)),
            Some(w) => Ok(w == key),
            None => Ok(false),
        }
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// Raises the marker error on whatever node it is asked to read.
struct Hit;

impl<'de> Visitor<'de> for Hit {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HIT))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(HIT))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(HIT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
a: 1
# comment
b:
  c: x
  d:
    - e: 1
      f: 2
    - {e: 3,
       f: 4}
g:
";

    fn p(segs: &[Seg]) -> KeyPath {
        KeyPath(segs.to_vec())
    }
    fn k(s: &str) -> Seg {
        Seg::Key(s.to_string())
    }

    #[test]
    fn finds_keys_items_and_flow_entries() {
        assert_eq!(line_of(DOC, &p(&[k("a")])), Some(1));
        assert_eq!(line_of(DOC, &p(&[k("b")])), Some(3));
        assert_eq!(line_of(DOC, &p(&[k("b"), k("c")])), Some(4));
        assert_eq!(line_of(DOC, &p(&[k("b"), k("d"), Seg::Index(0)])), Some(6));
        assert_eq!(line_of(DOC, &p(&[k("b"), k("d"), Seg::Index(0), k("f")])), Some(7));
        assert_eq!(line_of(DOC, &p(&[k("b"), k("d"), Seg::Index(1), k("f")])), Some(9));
        assert_eq!(line_of(DOC, &p(&[k("g")])), Some(10));
    }

    #[test]
    fn missing_keys_fall_back_to_the_parent() {
        assert_eq!(line_of(DOC, &p(&[k("b"), k("zzz")])), Some(3));
        assert_eq!(line_of(DOC, &p(&[k("b"), k("d"), Seg::Index(7), k("e")])), Some(5));
        assert_eq!(line_of(DOC, &p(&[k("g"), k("h")])), Some(10));
        assert_eq!(line_of(DOC, &KeyPath::root()), None);
    }

    #[test]
    fn renders_like_serde_path_to_error() {
        let path = KeyPath::root().key("applications").index(1).key("args").key("ranks");
        assert_eq!(path.to_string(), "applications[1].args.ranks");
    }
}
