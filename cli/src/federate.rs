//! `radfm federate`: federated training through an exchange folder, as the hub and each site run
//! it. The hub publishes a signed global model per round and aggregates the sites' signed
//! updates; a site fetches the global model (checking the hub's signature), turns its locally
//! trained weights into a bounded update, signs and uploads it. Sites only make outbound calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use radfm_data::store::Location;
use radfm_federated::admission::Round;
use radfm_federated::aggregate::Aggregator;
use radfm_federated::contribution::{Contribution, FORMAT};
use radfm_federated::exchange::{self, Exchange, Privacy};
use radfm_federated::privacy;
use radfm_federated::weights::{self, Precision, Weights};
use radfm_validation::report;

/// Largest model or update read from the exchange by default (4 GiB).
const DEFAULT_MAX_MODEL_BYTES: usize = 4 << 30;

/// The `radfm federate` subcommands.
#[derive(clap::Subcommand)]
pub enum FederateCmd {
    /// Hub: publish the global model that opens a round (round 1: the base model), signed.
    Publish(PublishArgs),
    /// Site: fetch the round's global model, checked against the hub's key, to train from.
    Fetch(FetchArgs),
    /// Site: fetch the round's global model, turn the locally trained weights into a bounded
    /// update, sign and upload it.
    Contribute(ContributeArgs),
    /// Hub: admit the round's signed updates, aggregate them and publish the next global model.
    Aggregate(AggregateArgs),
    /// Which rounds are published and which sites uploaded to each.
    Status(StatusArgs),
}

/// Where the federation exchanges models.
#[derive(clap::Args)]
pub struct ExchangeArgs {
    /// The exchange folder URI (s3://, gs://, az://, file://).
    #[arg(long)]
    pub exchange: String,
    /// The federation's name (`namespace/name` of its FederatedTraining).
    #[arg(long)]
    pub federation: String,
    /// Largest model or update read, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MODEL_BYTES)]
    pub max_model_bytes: usize,
}

impl ExchangeArgs {
    fn open(&self) -> Result<Exchange> {
        Ok(Exchange {
            location: Location::open(&self.exchange)?,
            federation: self.federation.clone(),
            max_model_bytes: self.max_model_bytes,
        })
    }
}

/// Arguments of `radfm federate publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    /// The round the model opens.
    #[arg(long, default_value_t = 1)]
    round: u32,
    /// The model: a safetensors file of F32 or BF16 tensors, or a checkpoint folder URI (its
    /// newest committed checkpoint, every variable).
    #[arg(long)]
    model: String,
    /// File holding the hub's ed25519 signing key (hex seed, `radfm keygen`).
    #[arg(long, env = "RADFM_SIGNING_KEY_FILE")]
    key_file: PathBuf,
}

/// Which global model a site takes, and whose signature it must carry.
#[derive(clap::Args)]
pub struct GlobalArgs {
    /// The round.
    #[arg(long)]
    round: u32,
    /// The hub's public key (hex): the global model must be signed with it.
    #[arg(long)]
    hub_key: String,
}

impl GlobalArgs {
    /// The round's global model and the hub's statement, checked.
    async fn fetch(&self, ex: &Exchange) -> Result<(Vec<u8>, exchange::GlobalStatement)> {
        ex.fetch_global(self.round, &self.hub_key)
            .await?
            .with_context(|| format!("round {} has no published global model yet", self.round))
    }
}

/// Arguments of `radfm federate fetch`.
#[derive(clap::Args)]
pub struct FetchArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    #[command(flatten)]
    global: GlobalArgs,
    /// Where to write the model (a local TrainingJob's `model.initFrom`).
    #[arg(long)]
    out: PathBuf,
}

/// Arguments of `radfm federate contribute`.
#[derive(clap::Args)]
pub struct ContributeArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    #[command(flatten)]
    global: GlobalArgs,
    /// This site's name, as the federation lists it.
    #[arg(long)]
    site: String,
    /// File holding the site's ed25519 signing key.
    #[arg(long, env = "RADFM_SIGNING_KEY_FILE")]
    key_file: PathBuf,
    /// The weights local training ended with, started from the round's global model: a
    /// safetensors file, or the local TrainingJob's checkpoint folder URI (its newest committed
    /// checkpoint; every variable, encoder and decoder).
    #[arg(long)]
    local: String,
    /// Training samples seen this round.
    #[arg(long)]
    samples: u64,
    /// Optimizer steps this round.
    #[arg(long)]
    steps: u64,
    /// Digest of the site's dataset index.
    #[arg(long)]
    dataset_index_digest: String,
    /// Local loss at the end of the round.
    #[arg(long, default_value_t = 0.0)]
    local_loss: f64,
    /// The federation's update-norm bound: a larger update is scaled down to it.
    #[arg(long)]
    norm_bound: f64,
    /// Precision of the uploaded update.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    precision: Wire,
}

/// Arguments of `radfm federate aggregate`.
#[derive(clap::Args)]
pub struct AggregateArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    /// The round to close.
    #[arg(long)]
    round: u32,
    /// A listed site and its public key, SITE=HEX (repeatable).
    #[arg(long = "site", required = true)]
    sites: Vec<String>,
    /// Fewest admitted sites the round needs.
    #[arg(long, default_value_t = 1)]
    min_sites: usize,
    /// How updates are combined: fedavg, median, or trimmed-mean:FRACTION.
    #[arg(long, default_value = "fedavg")]
    aggregator: String,
    /// Largest update norm admitted.
    #[arg(long)]
    norm_bound: f64,
    /// Client-level DP: clip every update to this norm (with --dp-noise-multiplier).
    #[arg(long, requires = "dp_noise_multiplier")]
    dp_clip: Option<f64>,
    /// Client-level DP: noise standard deviation in units of clip / sites.
    #[arg(long, requires = "dp_clip")]
    dp_noise_multiplier: Option<f64>,
    /// The δ the reported ε is computed at.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// File holding the hub's signing key.
    #[arg(long, env = "RADFM_SIGNING_KEY_FILE")]
    key_file: PathBuf,
    /// Precision of the published model.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    precision: Wire,
}

/// Arguments of `radfm federate status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    /// The hub's public key (hex).
    #[arg(long)]
    hub_key: String,
    /// Sites to look for, by name.
    #[arg(long = "site")]
    sites: Vec<String>,
}

/// The element type on the wire.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Wire {
    /// 4 bytes a value.
    F32,
    /// 2 bytes a value.
    Bf16,
}

impl From<Wire> for Precision {
    fn from(w: Wire) -> Precision {
        match w {
            Wire::F32 => Precision::F32,
            Wire::Bf16 => Precision::Bf16,
        }
    }
}

/// Runs a `radfm federate` subcommand.
pub async fn run(cmd: FederateCmd) -> Result<()> {
    match cmd {
        FederateCmd::Publish(a) => publish(a).await,
        FederateCmd::Fetch(a) => fetch(a).await,
        FederateCmd::Contribute(a) => contribute(a).await,
        FederateCmd::Aggregate(a) => aggregate(a).await,
        FederateCmd::Status(a) => status(a).await,
    }
}

fn read_weights(path: &Path) -> Result<(Vec<u8>, Weights)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let w = Weights::from_safetensors(&bytes, &path.display().to_string())?;
    Ok((bytes, w))
}

/// The weights of a local run: a safetensors file, or a checkpoint folder's newest committed
/// checkpoint.
async fn local_weights(local: &str) -> Result<Weights> {
    let path = Path::new(local);
    if path.is_file() {
        return Ok(read_weights(path)?.1);
    }
    checkpoint_weights(local).await
}

#[cfg(feature = "torch")]
async fn checkpoint_weights(uri: &str) -> Result<Weights> {
    let loc = Location::open(uri)?;
    let loaded = radfm_trainer::checkpoint::load_latest(&loc, |e| {
        eprintln!("radfm federate: skipping checkpoint: {e}");
    })
    .await?
    .with_context(|| format!("{uri} is neither a file nor a folder with committed checkpoints"))?;
    let bytes = loaded.object("model.safetensors")?;
    Ok(Weights::from_safetensors(bytes, &loaded.uri)?)
}

#[cfg(not(feature = "torch"))]
async fn checkpoint_weights(uri: &str) -> Result<Weights> {
    bail!("{uri} is not a file; reading checkpoints needs radfm built with the torch feature")
}

async fn publish(a: PublishArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let hub = crate::validate::read_signing_key(&a.key_file)?;
    let bytes = local_weights(&a.model)
        .await?
        .to_safetensors(Precision::F32)?;
    let previous = match a.round {
        1 => None,
        r => {
            let hub_hex = report::public_hex(&hub);
            let (_, s) = ex
                .fetch_global(r - 1, &hub_hex)
                .await?
                .with_context(|| format!("round {} has no published model", r - 1))?;
            Some(s.digest)
        }
    };
    let digest = ex.publish_global(a.round, &bytes, previous, &hub).await?;
    println!(
        "{}",
        serde_json::json!({"round": a.round, "digest": digest, "bytes": bytes.len()})
    );
    Ok(())
}

async fn fetch(a: FetchArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let (bytes, statement) = a.global.fetch(&ex).await?;
    std::fs::write(&a.out, &bytes).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}",
        serde_json::json!({"round": a.global.round, "digest": statement.digest, "bytes": bytes.len()})
    );
    Ok(())
}

async fn contribute(a: ContributeArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let key = crate::validate::read_signing_key(&a.key_file)?;
    let (global_bytes, statement) = a.global.fetch(&ex).await?;
    let round = a.global.round;
    let global = Weights::from_safetensors(&global_bytes, "the global model")?;
    let local = local_weights(&a.local).await?;
    let update = local.minus(&global, &a.local)?;
    let norm = update.norm();
    let update = privacy::clip(&update, a.norm_bound);
    let bytes = update.to_safetensors(a.precision.into())?;
    let c = Contribution {
        format: FORMAT.into(),
        federation: ex.federation.clone(),
        site: a.site.clone(),
        round,
        base_digest: statement.digest,
        update_digest: weights::digest(&bytes),
        samples: a.samples,
        steps: a.steps,
        dataset_index_digest: a.dataset_index_digest,
        local_loss: a.local_loss,
    };
    let signed = c.sign(&key);
    if !ex.contribute(&a.site, round, &bytes, &signed).await? {
        bail!("site {} already contributed to round {}", a.site, round);
    }
    let sent = bytes.len() + serde_json::to_vec(&signed)?.len();
    println!(
        "{}",
        serde_json::json!({"site": a.site, "round": round, "norm": norm,
            "clipped": norm > a.norm_bound, "bytesSent": sent})
    );
    Ok(())
}

fn aggregator(text: &str) -> Result<Aggregator> {
    Ok(match text {
        "fedavg" => Aggregator::FedAvg,
        "median" => Aggregator::Median,
        t => match t.strip_prefix("trimmed-mean:") {
            Some(f) => Aggregator::TrimmedMean {
                trim: f
                    .parse()
                    .with_context(|| format!("--aggregator {t}: trim fraction"))?,
            },
            None => bail!("--aggregator {t}: expected fedavg, median or trimmed-mean:FRACTION"),
        },
    })
}

fn sites(list: &[String]) -> Result<BTreeMap<String, String>> {
    list.iter()
        .map(|s| {
            let (name, key) = s
                .split_once('=')
                .with_context(|| format!("--site {s}: expected SITE=PUBLIC_KEY_HEX"))?;
            report::verifying_key(key).with_context(|| format!("--site {s}"))?;
            Ok((name.to_string(), key.to_string()))
        })
        .collect()
}

async fn aggregate(a: AggregateArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let hub = crate::validate::read_signing_key(&a.key_file)?;
    let listed = sites(&a.sites)?;
    let (global_bytes, statement) = ex
        .fetch_global(a.round, &report::public_hex(&hub))
        .await?
        .with_context(|| format!("round {} has no published global model", a.round))?;
    let global = Weights::from_safetensors(&global_bytes, "the global model")?;
    let round = Round {
        federation: ex.federation.clone(),
        round: a.round,
        base_digest: statement.digest.clone(),
        layout: global.clone(),
        norm_bound: a.norm_bound,
        sites: listed.clone(),
    };
    let submissions = ex
        .submissions(a.round, listed.keys().map(String::as_str))
        .await?;
    let privacy = match (a.dp_clip, a.dp_noise_multiplier) {
        (Some(clip), Some(noise_multiplier)) => Some((
            Privacy {
                clip,
                noise_multiplier,
            },
            rand::random::<[u8; 32]>(),
        )),
        _ => None,
    };
    let out = exchange::run_round(
        &round,
        &global,
        &submissions,
        aggregator(&a.aggregator)?,
        privacy,
        a.min_sites,
    )?;
    let next = exchange::encode(&out.next, a.precision.into())?;
    let digest = ex
        .publish_global(a.round + 1, &next, Some(statement.digest), &hub)
        .await?;
    let epsilon = match privacy {
        Some((p, _)) => Some(privacy::epsilon(p.noise_multiplier, a.round, a.dp_delta)?),
        None => None,
    };
    let admitted: Vec<_> = out
        .admitted
        .iter()
        .map(|x| {
            serde_json::json!({"site": x.contribution.site, "samples": x.contribution.samples,
                "norm": x.norm, "updateDigest": x.contribution.update_digest})
        })
        .collect();
    let rejected: Vec<_> = out
        .rejected
        .iter()
        .map(
            |(s, r)| serde_json::json!({"site": s, "reason": r.reason(), "message": r.to_string()}),
        )
        .collect();
    println!(
        "{}",
        serde_json::json!({"round": a.round, "admitted": admitted, "rejected": rejected,
            "next": {"round": a.round + 1, "digest": digest}, "epsilon": epsilon, "delta": a.dp_delta})
    );
    Ok(())
}

async fn status(a: StatusArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let mut round = 1;
    while let Some((_, s)) = ex.fetch_global(round, &a.hub_key).await? {
        let mut uploaded = Vec::new();
        for site in &a.sites {
            if ex
                .location
                .head_opt(&exchange::statement_key(site, round))
                .await?
                .is_some()
            {
                uploaded.push(site.as_str());
            }
        }
        println!(
            "round {round}\tmodel {}\tsites {}",
            &s.digest[..12],
            uploaded.join(",")
        );
        round += 1;
    }
    if round == 1 {
        println!("no round published yet");
    }
    Ok(())
}
