//! A run's evaluation steps that survive a kill (the resume cache) and the input model's scores
//! taken from or written to the eval cache, with where each came from for the report.

use super::scoring::{eval_perplexity_each, eval_tasks_each, task_context_len};
use crate::eval::dataset_key;
use crate::eval::ppl::PplResult;
use crate::info;
use crate::model::Checkpoint;
use crate::model::EvalOptions;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Where the input model's scores come from: the eval cache ([`crate::eval::cache`]) and what
/// each lookup found, for the report.
pub(super) struct BaselineCtx<'a> {
    pub(super) cache: Option<&'a crate::eval::cache::EvalCache>,
    pub(super) origin: &'a mut crate::report::Baseline,
}

impl BaselineCtx<'_> {
    fn lookup<T: serde::de::DeserializeOwned>(
        &mut self,
        item: &str,
        what: &serde_json::Value,
    ) -> Option<T> {
        let c = self.cache?;
        match c.get::<T>(what) {
            crate::eval::cache::Lookup::Hit(r, _) => {
                self.origin.items.insert(
                    item.to_string(),
                    crate::report::BaselineItem {
                        source: "cache".into(),
                        entry: Some(c.path(what).display().to_string()),
                    },
                );
                Some(r)
            }
            crate::eval::cache::Lookup::Miss => None,
        }
    }

    /// An item scored by the interrupted run this one resumes (from its cache or computed
    /// there): reported as such, not as computed in this run.
    fn resumed(&mut self, item: &str) {
        self.origin.items.insert(
            item.to_string(),
            crate::report::BaselineItem {
                source: "resumed".into(),
                entry: None,
            },
        );
    }

    fn computed<T: serde::Serialize>(
        &mut self,
        item: &str,
        what: Option<&serde_json::Value>,
        r: &T,
        seconds: f64,
    ) {
        let entry = match (self.cache, what) {
            (Some(c), Some(w)) => match c.put(w, r, seconds) {
                Ok(p) => Some(p.display().to_string()),
                Err(e) => {
                    info!("warning: the eval cache entry of {item} was not written: {e:#}");
                    None
                }
            },
            _ => None,
        };
        self.origin.items.insert(
            item.to_string(),
            crate::report::BaselineItem {
                source: "computed".into(),
                entry,
            },
        );
    }
}

/// Perplexity of `ckpt` on the pipeline's data sets, taking finished ones from `cache` and
/// recording each new one as it finishes; with `baseline`, also from and into the eval cache.
/// Returns the results and the seconds they took.
pub(super) fn ppl_cached(
    ckpt: &Checkpoint,
    e: &crate::pipeline::EvalSpec,
    label: &str,
    cache: &mut crate::resume::EvalCache,
    mut baseline: Option<&mut BaselineCtx>,
) -> Result<(BTreeMap<String, PplResult>, f64)> {
    let key = |f: &Path| format!("ppl/{label}/{}", dataset_key(f));
    let mut out = BTreeMap::new();
    let mut seconds = 0.0;
    let mut todo = Vec::new();
    let mut whats = BTreeMap::new();
    for f in &e.datasets {
        if let Some((r, s)) = cache.get::<PplResult>(&key(f)) {
            info!(
                "{label} {}: perplexity {:.4} (finished before the interruption)",
                dataset_key(f),
                r.perplexity
            );
            if let Some(b) = baseline.as_deref_mut() {
                b.resumed(&dataset_key(f));
            }
            out.insert(dataset_key(f), r);
            seconds += s;
            continue;
        }
        if let Some(b) = baseline.as_deref_mut().filter(|b| b.cache.is_some()) {
            let what = crate::eval::cache::EvalCache::ppl_what(f, e.seq_len, e.batch)?;
            if let Some(r) = b.lookup::<PplResult>(&dataset_key(f), &what) {
                info!(
                    "{label} {}: perplexity {:.4} (from the eval cache)",
                    dataset_key(f),
                    r.perplexity
                );
                cache.put(&key(f), &r, 0.0)?;
                out.insert(dataset_key(f), r);
                continue;
            }
            whats.insert(dataset_key(f), what);
        }
        todo.push(f.clone());
    }
    if !todo.is_empty() {
        let new = eval_perplexity_each(
            ckpt,
            &EvalOptions::in_precision(e.precision),
            &todo,
            e.seq_len,
            e.batch,
            label,
            &mut |f, r, s| {
                seconds += s;
                if let Some(b) = baseline.as_deref_mut() {
                    b.computed(&dataset_key(f), whats.get(&dataset_key(f)), r, s);
                }
                cache.put(&key(f), r, s)
            },
        )?;
        out.extend(new);
    }
    Ok((out, seconds))
}

/// [`ppl_cached`] for the zero-shot tasks.
pub(super) fn tasks_cached(
    ckpt: &Checkpoint,
    e: &crate::pipeline::EvalSpec,
    label: &str,
    cache: &mut crate::resume::EvalCache,
    mut baseline: Option<&mut BaselineCtx>,
) -> Result<(BTreeMap<String, crate::eval::tasks::TaskResult>, f64)> {
    use crate::eval::tasks::{Task, TaskResult};
    let key = |name: &str| format!("tasks/{label}/{name}");
    let mut out = BTreeMap::new();
    let mut seconds = 0.0;
    let mut todo = Vec::new();
    let mut whats = BTreeMap::new();
    for name in &e.tasks {
        let task = Task::from_name(name)?;
        let canon = task.name();
        if let Some((r, s)) = cache.get::<TaskResult>(&key(canon)) {
            info!(
                "{label} {canon}: {:?} (finished before the interruption)",
                r.metrics
            );
            if let Some(b) = baseline.as_deref_mut() {
                b.resumed(canon);
            }
            out.insert(canon.to_string(), r);
            seconds += s;
            continue;
        }
        if let Some(b) = baseline.as_deref_mut().filter(|b| b.cache.is_some()) {
            let what = crate::eval::cache::EvalCache::task_what(
                task,
                &e.tasks_dir,
                e.limit,
                task_context_len(ckpt),
            )?;
            if let Some(r) = b.lookup::<TaskResult>(canon, &what) {
                info!("{label} {canon}: {:?} (from the eval cache)", r.metrics);
                cache.put(&key(canon), &r, 0.0)?;
                out.insert(canon.to_string(), r);
                continue;
            }
            whats.insert(canon.to_string(), what);
        }
        todo.push(name.clone());
    }
    if !todo.is_empty() {
        let new = eval_tasks_each(
            ckpt,
            &EvalOptions::in_precision(e.precision),
            &todo,
            &e.tasks_dir,
            e.limit,
            label,
            &mut |n, r, s| {
                seconds += s;
                if let Some(b) = baseline.as_deref_mut() {
                    b.computed(n, whats.get(n), r, s);
                }
                cache.put(&key(n), r, s)
            },
        )?;
        out.extend(new);
    }
    Ok((out, seconds))
}
