//! Resource quantities and node descriptions (Ray's model: fixed-point amounts, per-GPU instances).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A fixed-point resource amount in 1/10000 units, as Ray stores them, so that `0.1 + 0.2`
/// CPUs compares exactly and repeated allocate/release never drifts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Quantity(pub i64);

impl Quantity {
    pub const UNIT: i64 = 10_000;
    pub const ZERO: Quantity = Quantity(0);

    /// Rounds to the nearest 1/10000; negative and non-finite inputs become zero (validation
    /// rejects them earlier, this only keeps the arithmetic total).
    pub fn from_f64(x: f64) -> Self {
        if !x.is_finite() || x <= 0.0 {
            return Quantity(0);
        }
        Quantity((x * Self::UNIT as f64).round() as i64)
    }

    pub fn from_units(n: u32) -> Self {
        Quantity(i64::from(n) * Self::UNIT)
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::UNIT as f64
    }

    pub fn saturating_sub(self, other: Quantity) -> Quantity {
        Quantity((self.0 - other.0).max(0))
    }
}

impl std::ops::Add for Quantity {
    type Output = Quantity;
    fn add(self, o: Quantity) -> Quantity {
        Quantity(self.0 + o.0)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / Self::UNIT;
        let frac = self.0 % Self::UNIT;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{frac:04}");
            write!(f, "{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

impl Serialize for Quantity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Quantity::from_f64(f64::deserialize(d)?))
    }
}

/// What one node offers: CPUs, its GPUs by *physical* id, and custom resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub node_id: String,
    pub address: String,
    pub cpus: Quantity,
    /// Physical GPU ids (what `CUDA_VISIBLE_DEVICES` names under `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub gpu_ids: Vec<u32>,
    #[serde(default)]
    pub custom: BTreeMap<String, Quantity>,
}

/// What one application asks for. GPUs are whole cards: two applications never share a card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    pub app: String,
    pub gpus: u32,
    pub cpus: Quantity,
    #[serde(default)]
    pub custom: BTreeMap<String, Quantity>,
}

impl fmt::Display for Demand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} GPU, {} CPU", self.gpus, self.cpus)?;
        for (k, v) in &self.custom {
            write!(f, ", {v} {k}")?;
        }
        Ok(())
    }
}

/// Where an application was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub app: String,
    pub node_id: String,
    pub gpu_ids: Vec<u32>,
    pub cpus: Quantity,
    #[serde(default)]
    pub custom: BTreeMap<String, Quantity>,
}

impl Allocation {
    /// The value of `CUDA_VISIBLE_DEVICES` for this application's child ("" for CPU only).
    pub fn cuda_visible_devices(&self) -> String {
        self.gpu_ids.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(",")
    }
}
