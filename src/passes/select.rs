//! `targets` / `ignore` patterns: `re:<regex>` (matched from the start of the module name, as
//! compressed-tensors does), `Linear` (every linear), or a module name / name suffix.

use anyhow::{Context, Result};
use regex::Regex;

enum Pat {
    Re(Regex),
    All,
    Name(String),
}

impl Pat {
    fn parse(s: &str) -> Result<Pat> {
        Ok(if let Some(r) = s.strip_prefix("re:") {
            Pat::Re(Regex::new(&format!("^(?:{r})")).with_context(|| format!("bad regex `{r}`"))?)
        } else if s == "Linear" {
            Pat::All
        } else {
            Pat::Name(s.to_string())
        })
    }
    fn matches(&self, module: &str) -> bool {
        match self {
            Pat::Re(r) => r.is_match(module),
            Pat::All => true,
            Pat::Name(n) => module == n || module.ends_with(&format!(".{n}")),
        }
    }
}

pub struct Selector {
    targets: Vec<Pat>,
    ignore: Vec<Pat>,
}

impl Selector {
    pub fn new(targets: &[String], ignore: &[String]) -> Result<Self> {
        Ok(Selector {
            targets: targets
                .iter()
                .map(|s| Pat::parse(s))
                .collect::<Result<_>>()?,
            ignore: ignore
                .iter()
                .map(|s| Pat::parse(s))
                .collect::<Result<_>>()?,
        })
    }

    /// Whether the pass applies to the linear `name` of the layer in `ctx`.
    pub fn selects_in(&self, ctx: &crate::engine::LayerCtx, name: &str) -> bool {
        let router = ctx.config.block().linear(name).is_some_and(|l| l.router);
        self.selects(&ctx.module_name(name), router)
    }

    /// Whether the pass applies to the linear with this full module name. A `router` (a
    /// mixture's gate) is not one of `Linear`: it stays dense unless a name or regex in
    /// `targets` names it (quantizing the router changes which experts run).
    pub fn selects(&self, module: &str, router: bool) -> bool {
        self.targets
            .iter()
            .any(|p| p.matches(module) && !(router && matches!(p, Pat::All)))
            && !self.ignore.iter().any(|p| p.matches(module))
    }
}
