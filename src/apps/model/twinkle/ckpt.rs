//! Checkpoints of the Twinkle layer: `save` (PEFT directory, optimizer state, `trainer_state.json`,
//! run metadata), `load` and `resume_from_checkpoint` from the caller's own `twinkle://` paths,
//! and `get_state_dict`.

use serde_json::{Map, Value, json};

use super::{TwinkleModel, lock};
use crate::apps::twinkle_http::Call;
use crate::protocol::internal::{LoadRequest, SaveKind, SaveRequest};
use crate::protocol::tinker::paths::CheckpointKind;
use crate::protocol::twinkle::runs::{self, RunMeta, TRAINER_STATE};
use crate::protocol::twinkle::{Gen, TwinkleError, TwinklePath, paths};

/// `name` of save/load: a full `twinkle://` path, or a bare checkpoint name of the adapter's own
/// run (`weights/NAME`).
fn checkpoint_path(body: &Map<String, Value>, run_id: &str) -> Result<TwinklePath, TwinkleError> {
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TwinkleError::bad("name is missing: a twinkle://RUN/weights/NAME path or a checkpoint name of this run"))?;
    if name.contains("://") || name.contains('/') {
        return TwinklePath::parse("name", name);
    }
    TwinklePath::new(run_id, CheckpointKind::Weights, name)
}

fn timestamp_name() -> String {
    // `%Y%m%d_%H%M%S` in UTC, like the Python server's default checkpoint names.
    let iso = runs::now_iso(); // 2026-12-06T07:01:02.345Z
    let digits: String = iso.chars().filter(char::is_ascii_digit).collect();
    format!(
        "{}_{}",
        &digits[..8.min(digits.len())],
        &digits[8.min(digits.len())..14.min(digits.len())]
    )
}

impl TwinkleModel {
    pub(super) fn save(&self, c: Call) -> Result<Value, TwinkleError> {
        let (caller, body) = (c.caller, c.body);
        self.with_state(c, |st| {
        let sampler = c.flag("is_sampler");
        let with_optim = c.flag("save_optimizer");
        let name = match body.get("name") {
            None | Some(Value::Null) => timestamp_name(),
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            Some(other) => {
                return Err(TwinkleError::bad(format!(
                    "name must be a checkpoint name, got {other}"
                )));
            }
        };
        if let Some(n) = body.get("consumed_train_samples").and_then(Value::as_u64) {
            st.consumed_train_samples = n;
        }
        let kind = if sampler { CheckpointKind::SamplerWeights } else { CheckpointKind::Weights };
        let path = TwinklePath::new(&st.run_id, kind, &name)?;
        let dir = path.dir(&self.auth, caller)?;
        let save_kind = if with_optim && !sampler { SaveKind::State } else { SaveKind::Sampler };
        self.app.save(&SaveRequest {
            model_id: st.engine_id.clone(),
            dir: dir.clone(),
            kind: save_kind,
        })?;
        runs::write_json(
            &dir.join(TRAINER_STATE),
            &json!({"cur_step": st.cur_step, "consumed_train_samples": st.consumed_train_samples,
                    "gradient_accumulation_steps": st.ga_steps, "lr_scheduler_steps": st.sched_steps}),
        )?;
        let run_dir = paths::caller_run_dir(&self.auth, caller, &st.run_id)?;
        let mut run: RunMeta = runs::read_run(&run_dir)?.ok_or_else(|| {
            TwinkleError::Internal(format!("run {} lost its metadata", st.run_id))
        })?;
        runs::record_checkpoint(&run_dir, &path, &dir, &mut run)?;
        let dir_s = dir.display().to_string();
        Ok(match c.g {
            Gen::One => json!({"result": path.to_string(), "checkpoint_dir": dir_s}),
            Gen::Two => json!({"twinkle_path": path.to_string(), "checkpoint_dir": dir_s}),
        })
        })
    }

    /// Loads a checkpoint of the caller's onto the adapter; returns its trainer state.
    fn load_into(
        &self,
        c: Call,
        with_optim: bool,
    ) -> Result<(std::sync::Arc<std::sync::Mutex<super::TrainState>>, Value), TwinkleError> {
        let s = self.state(c)?;
        let (run_id, eid) = {
            let st = lock(&s);
            (st.run_id.clone(), st.engine_id.clone())
        };
        let path = checkpoint_path(c.body, &run_id)?;
        let dir = path.dir(&self.auth, c.caller)?;
        if !dir.join(runs::CHECKPOINT_META).is_file() && !dir.join("adapter_config.json").is_file()
        {
            return Err(TwinkleError::NotFound(format!("checkpoint {path} does not exist")));
        }
        self.app.load(&LoadRequest {
            model_id: eid,
            dir: dir.clone(),
            with_optimizer: with_optim,
            create: None,
        })?;
        let state = runs::read_json::<Value>(&dir.join(TRAINER_STATE))?.unwrap_or(Value::Null);
        let mut st = lock(&s);
        st.micro = 0;
        st.clip = None;
        st.staged = None;
        drop(st);
        Ok((s, state))
    }

    pub(super) fn load(&self, c: Call) -> Result<Value, TwinkleError> {
        self.load_into(c, c.flag("load_optimizer"))?;
        Ok(Self::unit(c.g))
    }

    pub(super) fn resume(&self, c: Call) -> Result<Value, TwinkleError> {
        let only_model = c.flag("resume_only_model");
        let (s, state) = self.load_into(c, !only_model)?;
        let mut st = lock(&s);
        let num = |k: &str| state.get(k).and_then(Value::as_u64);
        if !only_model {
            st.cur_step = num("cur_step").unwrap_or(0);
            st.sched_steps = num("lr_scheduler_steps").unwrap_or(st.cur_step);
        }
        st.consumed_train_samples = num("consumed_train_samples").unwrap_or(0);
        if let Some(ga) = num("gradient_accumulation_steps").filter(|&g| g >= 1) {
            st.ga_steps = ga;
        }
        Ok(
            json!({"result": {"cur_step": st.cur_step, "consumed_train_samples": st.consumed_train_samples,
                             "gradient_accumulation_steps": st.ga_steps}}),
        )
    }

    pub(super) fn state_dict(&self, c: Call) -> Result<Value, TwinkleError> {
        let id = self.with_state(c, |st| Ok(st.engine_id.clone()))?;
        let adapter = self.app.download(&id)?;
        let mut out = Map::new();
        for (k, t) in adapter.tensors() {
            let shape = t.shape().to_vec();
            let cols = shape.last().copied().unwrap_or(1).max(1);
            let rows: Vec<Value> = t.data().chunks(cols).map(|r| json!(r)).collect();
            out.insert(k, Value::Array(rows));
        }
        Ok(json!({"result": out}))
    }
}
