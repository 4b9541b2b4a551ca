//! `radfm registry`: versions, aliases, lineage and history of models in a registry.

use anyhow::Result;
use clap::Subcommand;
use radfm_registry::{EventKind, NewVersion, Registry};

/// Registry commands.
#[derive(Subcommand)]
pub enum RegistryCmd {
    /// Models, or the versions of one model with their aliases.
    List {
        /// Registry URI.
        registry: String,
        /// A model.
        model: Option<String>,
    },
    /// A version's manifest (by number or alias) as JSON.
    Show {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// Version number or alias.
        version: String,
    },
    /// A version and its ancestors (initFrom chain).
    Lineage {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// Version number or alias.
        version: String,
    },
    /// The model's event log: registrations and alias moves, with who and why.
    History {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
    },
    /// Check the event log as a signed chain: no event missing, edited or reordered, each one
    /// signed by a trusted key (exit status 1 when anything is wrong).
    Verify {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// A trusted signer's public key, hex (the operator's; repeatable).
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<String>,
    },
    /// End the governing PromotionPolicy's claim over a model (a handover to another policy of
    /// the owning namespace).
    ReleaseGovernance {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// Why (recorded in the history).
        #[arg(long)]
        reason: String,
        /// Who (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Register an exported model folder (`radfm export` output) as a new version.
    Register {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// Exported model folder URI.
        #[arg(long)]
        export: String,
        /// Version it was trained from.
        #[arg(long)]
        parent: Option<u64>,
        /// Alias to move to the new version.
        #[arg(long, default_value = "candidate")]
        alias: String,
        /// Why.
        #[arg(long, default_value = "registered")]
        reason: String,
        /// Who (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Move an alias (default production) to a version.
    Promote {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// Version number or alias.
        version: String,
        /// Alias to move.
        #[arg(long, default_value = "production")]
        alias: String,
        /// Only if the alias is now at this version (0: not set yet).
        #[arg(long)]
        expect: Option<u64>,
        /// Why (recorded in the history).
        #[arg(long)]
        reason: String,
        /// Who (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Move an alias back to its previous version.
    Rollback {
        /// Registry URI.
        registry: String,
        /// Model.
        model: String,
        /// Alias to move back.
        #[arg(long, default_value = "production")]
        alias: String,
        /// Why (recorded in the history).
        #[arg(long)]
        reason: String,
        /// Who (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

fn who(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// `radfm registry list`: the models, or one model's versions with their aliases.
async fn list(registry: &str, model: Option<String>) -> Result<()> {
    let r = Registry::open(registry)?;
    let Some(m) = model else {
        for m in r.models().await? {
            println!("{m}");
        }
        return Ok(());
    };
    let aliases = r.aliases(&m).await?;
    println!(
        "{:<8} {:<26} {:<10} {:<20} ALIASES",
        "VERSION", "CREATED", "PARENT", "JOB"
    );
    for v in r.versions(&m).await? {
        let names: Vec<&str> = aliases
            .iter()
            .filter(|(_, t)| **t == v.version)
            .map(|(a, _)| a.as_str())
            .collect();
        println!(
            "{:<8} {:<26} {:<10} {:<20} {}",
            v.version,
            v.created.chars().take(25).collect::<String>(),
            v.spec.parent.map_or("-".into(), |p| p.to_string()),
            v.spec.job_name.clone().unwrap_or_else(|| "-".into()),
            names.join(",")
        );
    }
    Ok(())
}

/// `radfm registry lineage`: the version and its ancestors, indented.
async fn lineage(registry: &str, model: &str, version: &str) -> Result<()> {
    let r = Registry::open(registry)?;
    let chain = r.lineage(model, r.resolve(model, version).await?).await?;
    for (depth, v) in chain.iter().enumerate() {
        let indent = "  ".repeat(depth);
        if let Some(f) = &v.spec.federated {
            println!(
                "{indent}{model} v{} ({}, federated {} through {}, {} rounds)",
                v.version,
                v.created,
                f.federation,
                f.exchange,
                f.rounds.len()
            );
            for line in federated_rounds(f) {
                println!("{indent}  {line}");
            }
            continue;
        }
        println!(
            "{indent}{model} v{} ({}, data {} shards {}..{}, {})",
            v.version,
            v.created,
            v.spec.data.index_uri,
            v.spec.data.first_seq,
            v.spec.data.last_seq,
            v.spec.job_name.clone().unwrap_or_else(|| "no job".into())
        );
        if let Some(t) = &v.spec.trigger {
            println!("{indent}  triggered by {:?}: {}", t.kind, t.summary);
            for d in &t.drift {
                println!(
                    "{indent}    drift at {} ({} v{}, signed {}): {} [{}]",
                    d.site,
                    d.model,
                    d.version,
                    d.created,
                    d.evidence.join("; "),
                    d.report
                );
            }
        }
    }
    Ok(())
}

/// One line per round of a federated version: who contributed what, who was refused and why.
pub fn federated_rounds(f: &radfm_registry::federated::FederatedLineage) -> Vec<String> {
    f.rounds
        .iter()
        .map(|r| {
            let sites: Vec<String> = r
                .admitted
                .iter()
                .map(|c| format!("{} {} samples (norm {:.3})", c.site, c.samples, c.norm))
                .collect();
            let refused: Vec<String> = r
                .rejected
                .iter()
                .map(|x| format!("{} {}", x.site, x.reason))
                .collect();
            let privacy = r
                .privacy
                .map_or(String::new(), |p| format!("; ε {:.3}", p.epsilon));
            format!(
                "round {}: {} [{}]{}{privacy}; model {}",
                r.round,
                sites.join(", "),
                r.aggregator,
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; refused {}", refused.join(", "))
                },
                r.next_digest
            )
        })
        .collect()
}

/// `radfm registry history`: the event log.
async fn history(registry: &str, model: &str) -> Result<()> {
    let r = Registry::open(registry)?;
    for e in r.events(model).await? {
        let what = e.kind.to_string();
        println!(
            "{:>4} {} {:<12} {:<28} {}",
            e.seq, e.time, e.by, what, e.reason
        );
    }
    Ok(())
}

/// Runs a registry command.
pub async fn run(cmd: RegistryCmd) -> Result<()> {
    match cmd {
        RegistryCmd::List { registry, model } => list(&registry, model).await?,
        RegistryCmd::Show {
            registry,
            model,
            version,
        } => {
            let r = Registry::open(&registry)?;
            let v = r
                .version(&model, r.resolve(&model, &version).await?)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        RegistryCmd::Lineage {
            registry,
            model,
            version,
        } => lineage(&registry, &model, &version).await?,
        RegistryCmd::History { registry, model } => history(&registry, &model).await?,
        RegistryCmd::Verify {
            registry,
            model,
            trusted_keys,
        } => verify(&registry, &model, &trusted_keys).await?,
        RegistryCmd::ReleaseGovernance {
            registry,
            model,
            reason,
            by,
        } => release(&registry, &model, &who(by), &reason).await?,
        RegistryCmd::Register {
            registry,
            model,
            export,
            parent,
            alias,
            reason,
            by,
        } => {
            let r = Registry::open(&registry)?;
            let spec = radfm_registry::from_export(&export).await?;
            let spec = NewVersion { parent, ..spec };
            let v = r
                .register(&model, spec, &who(by), &reason, Some(&alias))
                .await?;
            println!("registered {model} v{} ({alias})", v.version);
        }
        RegistryCmd::Promote {
            registry,
            model,
            version,
            alias,
            expect,
            reason,
            by,
        } => {
            let r = Registry::open(&registry)?;
            let to = r.resolve(&model, &version).await?;
            let e = r
                .move_alias(&model, &alias, to, expect, &who(by), &reason)
                .await?;
            println!("{model} {alias} -> v{to} (event {})", e.seq);
        }
        RegistryCmd::Rollback {
            registry,
            model,
            alias,
            reason,
            by,
        } => {
            let r = Registry::open(&registry)?;
            let e = r.rollback(&model, &alias, &who(by), &reason).await?;
            if let EventKind::AliasMoved { to, .. } = e.kind {
                println!("{model} {alias} -> v{to} (event {})", e.seq);
            }
        }
    }
    Ok(())
}

async fn release(registry: &str, model: &str, by: &str, reason: &str) -> Result<()> {
    let g = Registry::open(registry)?.release(model, by, reason).await?;
    println!(
        "{model}: released by PromotionPolicy {}/{}",
        g.namespace, g.policy
    );
    Ok(())
}

async fn verify(registry: &str, model: &str, trusted: &[String]) -> Result<()> {
    let r = Registry::open(registry)?;
    let problems = r.verify(model, trusted).await?;
    if problems.is_empty() {
        println!("{model}: chain intact, every event signed by a trusted key");
        return Ok(());
    }
    for p in &problems {
        println!("event {}: {}", p.seq, p.problem);
    }
    anyhow::bail!(
        "{model}: {} problem(s) in the event log of {registry}",
        problems.len()
    )
}
