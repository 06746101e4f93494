//! Predictions read out of the models' answers, per variant: a histogram for numbers, a
//! counter per class for labels, and the canary guard's drift sample.
//!
//! The answer streams to the client untouched: its frames are kept by reference (a second
//! frame is copied, up to `prediction_max_bytes`) and read once the body has been handed over
//! in full, so reading never delays a byte.

use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use bytes::{Bytes, BytesMut};
use metrics::{Counter, Histogram};
use serde_json::Value;

use crate::canary::window::ArmWindow;
use crate::json_pointer::JsonPointer;
use crate::metrics::Metrics;

/// Why an answer's prediction was not read; the `reason` label of
/// `abproxy_prediction_unread_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread {
    /// Longer than `prediction_max_bytes`.
    OverCap = 0,
    NotJson = 1,
    /// JSON, but no number or string at any of the pointers.
    NoPrediction = 2,
}

impl Unread {
    pub const ALL: [Unread; 3] = [Unread::OverCap, Unread::NotJson, Unread::NoPrediction];

    pub fn as_str(self) -> &'static str {
        match self {
            Unread::OverCap => "over_cap",
            Unread::NotJson => "not_json",
            Unread::NoPrediction => "no_prediction",
        }
    }
}

/// The class labels that get a series of their own, shared by every variant so that the
/// guard compares the same classes in both arms. The first labels seen win their place:
/// models answer from a fixed label set, and a stable set keeps dashboards' series stable.
#[derive(Debug, Default)]
pub struct ClassTable(RwLock<Vec<Box<str>>>);

impl ClassTable {
    /// The label's place, or `None` (counted as `other`) once `limit` labels are known.
    fn index(&self, label: &str, limit: usize) -> Option<usize> {
        let known = |names: &[Box<str>]| names.iter().position(|name| &**name == label);
        let names = self.0.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = known(&names) {
            return (index < limit).then_some(index);
        }
        drop(names);
        let mut names = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = known(&names) {
            return (index < limit).then_some(index);
        }
        if names.len() >= limit {
            return None;
        }
        names.push(label.into());
        Some(names.len() - 1)
    }
}

/// One variant's prediction metrics, built once per config generation.
pub struct Predictions {
    pointers: Box<[JsonPointer]>,
    max_bytes: usize,
    max_classes: usize,
    classes: Arc<ClassTable>,
    values: Histogram,
    /// One slot per class place plus `other`, registered on first use.
    class_counters: Box<[OnceLock<Counter>]>,
    unread: [Counter; 3],
    window: Option<Arc<ArmWindow>>,
    variant: Arc<str>,
    registry: Metrics,
}

impl Predictions {
    pub fn new(
        config: &crate::config::Metrics,
        variant: &str,
        registry: &Metrics,
        window: Option<Arc<ArmWindow>>,
    ) -> Predictions {
        Predictions {
            pointers: config.prediction.clone().into(),
            max_bytes: config.prediction_max_bytes,
            max_classes: config.prediction_classes,
            classes: registry.classes(),
            values: registry.prediction_histogram(variant),
            class_counters: (0..=config.prediction_classes)
                .map(|_| OnceLock::new())
                .collect(),
            unread: Unread::ALL.map(|reason| registry.prediction_unread(variant, reason)),
            window,
            variant: variant.into(),
            registry: registry.clone(),
        }
    }

    /// Reads the prediction of one whole answer.
    pub fn read(&self, body: &[u8]) {
        for pointer in self.pointers.iter() {
            match pointer.value_in(body) {
                Some(Value::Number(number)) => match number.as_f64() {
                    Some(value) if value.is_finite() => return self.number(value),
                    _ => {}
                },
                Some(Value::String(label)) => return self.class(&label),
                Some(Value::Bool(flag)) => return self.class(if flag { "true" } else { "false" }),
                _ => {}
            }
        }
        // Rare: told apart only to say why nothing was read.
        let reason = match serde_json::from_slice::<Value>(body) {
            Ok(_) => Unread::NoPrediction,
            Err(_) => Unread::NotJson,
        };
        self.unread(reason);
    }

    fn number(&self, value: f64) {
        self.values.record(value);
        if let Some(window) = &self.window {
            window.record_prediction(value);
        }
    }

    fn class(&self, label: &str) {
        let index = self.classes.index(label, self.max_classes);
        let slot = index.unwrap_or(self.max_classes);
        self.class_counters[slot]
            .get_or_init(|| {
                let label = if index.is_some() { label } else { "other" };
                self.registry.prediction_class(&self.variant, label)
            })
            .increment(1);
        if let Some(window) = &self.window {
            window.record_class(slot);
        }
    }

    fn unread(&self, reason: Unread) {
        self.unread[reason as usize].increment(1);
    }
}

/// One answer on its way to the client, held for reading when it is complete.
pub struct Inspection {
    predictions: Arc<Predictions>,
    /// The first frame, by reference: most answers are one frame and are never copied.
    first: Option<Bytes>,
    /// Later frames, copied after the first, up to the cap.
    rest: BytesMut,
    held: usize,
    over_cap: bool,
    complete: bool,
}

impl Inspection {
    pub fn new(predictions: Arc<Predictions>) -> Inspection {
        Inspection {
            predictions,
            first: None,
            rest: BytesMut::new(),
            held: 0,
            over_cap: false,
            complete: false,
        }
    }

    pub fn push(&mut self, data: &Bytes) {
        if self.over_cap {
            return;
        }
        self.held += data.len();
        if self.held > self.predictions.max_bytes {
            self.over_cap = true;
            self.first = None;
            self.rest = BytesMut::new();
            return;
        }
        match &self.first {
            None if self.rest.is_empty() => self.first = Some(data.clone()),
            None => self.rest.extend_from_slice(data),
            Some(first) => {
                self.rest.reserve(self.held);
                self.rest.extend_from_slice(first);
                self.rest.extend_from_slice(data);
                self.first = None;
            }
        }
    }

    /// The answer reached its end; it is read when the body is dropped, after its last frame
    /// went to the client.
    pub fn complete(&mut self) {
        self.complete = true;
    }
}

impl Drop for Inspection {
    fn drop(&mut self) {
        // An answer cut short is a failure or a client gone, not a prediction.
        if !self.complete {
            return;
        }
        if self.over_cap {
            return self.predictions.unread(Unread::OverCap);
        }
        match &self.first {
            Some(first) => self.predictions.read(first),
            None => self.predictions.read(&self.rest),
        }
    }
}
