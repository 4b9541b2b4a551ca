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
use radfm_federated::exchange::{self, Closing, Exchange, Privacy};
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
    /// Hub: export the federation's result and register it in a model registry with the
    /// lineage of every round (a candidate: promotion stays with the PromotionPolicy).
    Register(RegisterArgs),
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

/// The federation's schedule, signed into each global model's statement.
#[derive(clap::Args)]
pub struct ScheduleArgs {
    /// The last training round (the model opening the round after it is the result).
    #[arg(long)]
    last_round: u32,
    /// Optimizer steps each site runs a round.
    #[arg(long)]
    local_steps: u64,
    /// Largest update norm admitted (sites clip their updates to it).
    #[arg(long)]
    norm_bound: f64,
}

impl From<&ScheduleArgs> for exchange::Schedule {
    fn from(a: &ScheduleArgs) -> exchange::Schedule {
        exchange::Schedule {
            last_round: a.last_round,
            local_steps: a.local_steps,
            norm_bound: a.norm_bound,
        }
    }
}

/// Arguments of `radfm federate publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
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
    /// Where to write the model (a local TrainingJob's `model.initFrom`): a file, or a store URI
    /// ending in `.safetensors` (written with the environment's own store settings).
    #[arg(long)]
    out: String,
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
    /// Training samples seen this round (default: from the checkpoint: steps × batch ×
    /// accumulation × processes).
    #[arg(long)]
    samples: Option<u64>,
    /// Optimizer steps this round (default: the checkpoint's step).
    #[arg(long)]
    steps: Option<u64>,
    /// Digest of the site's dataset index (default: the sha256 of the index.json the checkpoint
    /// trained on).
    #[arg(long)]
    dataset_index_digest: Option<String>,
    /// Local loss at the end of the round (default: the checkpoint's).
    #[arg(long)]
    local_loss: Option<f64>,
    /// The update-norm bound a larger update is scaled down to (default: the hub's, from the
    /// global model's statement).
    #[arg(long)]
    norm_bound: Option<f64>,
    /// Precision of the uploaded update.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    precision: Wire,
}

/// Arguments of `radfm federate aggregate`.
#[derive(clap::Args)]
pub struct AggregateArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
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
    aggregator: Aggregator,
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

/// Arguments of `radfm federate register`.
#[derive(clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    exchange: ExchangeArgs,
    /// The hub's public key (hex): every round record and the result must be signed with it
    /// (default: the public half of --key-file).
    #[arg(long)]
    hub_key: Option<String>,
    /// File holding the hub's signing key (only its public half is used).
    #[arg(long, env = "RADFM_SIGNING_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// The federation's last training round (the result is the model opening the next one).
    #[arg(long)]
    last_round: u32,
    /// The model round 1 started from (a checkpoint folder or an exported model folder): the
    /// result's model card takes its architecture and input normalisation.
    #[arg(long)]
    base: String,
    /// Where to export the result (a folder URI).
    #[arg(long)]
    out: String,
    /// The registry URI.
    #[arg(long)]
    registry: String,
    /// The model name in the registry.
    #[arg(long)]
    model: String,
    /// The alias the new version gets (never production: promotion is the gate's).
    #[arg(long, default_value = "candidate")]
    alias: String,
    /// The registered version round 1 started from, if it was one.
    #[arg(long)]
    parent: Option<u64>,
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
        FederateCmd::Register(a) => register(a).await,
    }
}

fn read_weights(path: &Path) -> Result<(Vec<u8>, Weights)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let w = Weights::from_safetensors(&bytes, &path.display().to_string())?;
    Ok((bytes, w))
}

/// What a checkpoint says about the local training that wrote it.
#[derive(Debug, Clone, PartialEq)]
struct LocalRun {
    steps: u64,
    samples: u64,
    loss: Option<f64>,
    dataset_uri: String,
}

/// The weights of a local run: a safetensors file, or a checkpoint folder's newest committed
/// checkpoint (with what it says about the run).
async fn local_weights(local: &str) -> Result<(Weights, Option<LocalRun>)> {
    let path = Path::new(local);
    if path.is_file() {
        return Ok((read_weights(path)?.1, None));
    }
    let (w, run) = checkpoint_weights(local).await?;
    Ok((w, Some(run)))
}

/// The whole model of an exported folder (`model_card.json`): its encoder and a decoder
/// initialised from a fixed seed, so that every site starts round 1 from the same one.
#[cfg(feature = "torch")]
async fn exported_weights(uri: &str) -> Result<Option<Weights>> {
    if Path::new(uri).is_file() || uri.ends_with(".safetensors") {
        return Ok(None);
    }
    let loc = Location::open(uri)?;
    if loc.get_opt(radfm_api::export_files::CARD).await?.is_none() {
        return Ok(None);
    }
    let bytes = radfm_trainer::export::full_model(uri, 0).await?;
    Ok(Some(Weights::from_safetensors(&bytes, uri)?))
}

#[cfg(not(feature = "torch"))]
async fn exported_weights(_uri: &str) -> Result<Option<Weights>> {
    Ok(None)
}

#[cfg(feature = "torch")]
async fn checkpoint_weights(uri: &str) -> Result<(Weights, LocalRun)> {
    let loc = Location::open(uri)?;
    let loaded = radfm_trainer::checkpoint::load_latest(&loc, |e| {
        eprintln!("radfm federate: skipping checkpoint: {e}");
    })
    .await?
    .with_context(|| format!("{uri} is neither a file nor a folder with committed checkpoints"))?;
    let bytes = loaded.object("model.safetensors")?;
    let state = &loaded.manifest.state;
    let per_step = ["batch_size", "grad_accumulation", "world"]
        .iter()
        .map(|k| state.config[k].as_u64().unwrap_or(1))
        .product::<u64>();
    let steps = u64::try_from(state.step).unwrap_or(0);
    let run = LocalRun {
        steps,
        samples: steps * per_step,
        loss: state.loss,
        dataset_uri: state.data.uri.clone(),
    };
    Ok((Weights::from_safetensors(bytes, &loaded.uri)?, run))
}

#[cfg(not(feature = "torch"))]
async fn checkpoint_weights(uri: &str) -> Result<(Weights, LocalRun)> {
    bail!("{uri} is not a file; reading checkpoints needs radfm built with the torch feature")
}

async fn publish(a: PublishArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let hub = crate::validate::read_signing_key(&a.key_file)?;
    let model = match exported_weights(&a.model).await? {
        Some(w) => w,
        None => local_weights(&a.model).await?.0,
    };
    let bytes = model.to_safetensors(Precision::F32)?;
    let previous = match a.round {
        1 => None,
        r => {
            let hub_hex = report::public_hex(&hub);
            let s = ex
                .global_statement(r - 1, Some(&hub_hex))
                .await?
                .with_context(|| format!("round {} has no published model", r - 1))?;
            Some(s.digest)
        }
    };
    let digest = ex
        .publish_global(a.round, &bytes, previous, (&a.schedule).into(), &hub)
        .await?;
    println!(
        "{}",
        serde_json::json!({"round": a.round, "digest": digest, "bytes": bytes.len()})
    );
    Ok(())
}

/// Writes `bytes` to `out`: a local file, or an object at a store URI.
async fn write_out(out: &str, bytes: Vec<u8>) -> Result<()> {
    match out.split_once("://") {
        Some((scheme, _)) if scheme != "file" => {
            let (folder, name) = out
                .rsplit_once('/')
                .with_context(|| format!("--out {out}: expected FOLDER/NAME.safetensors"))?;
            Location::open(folder)?.put(name, bytes).await?;
        }
        _ => {
            let path = PathBuf::from(out.strip_prefix("file://").unwrap_or(out));
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

async fn fetch(a: FetchArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let (bytes, statement) = a.global.fetch(&ex).await?;
    let len = bytes.len();
    write_out(&a.out, bytes).await?;
    println!(
        "{}",
        serde_json::json!({"round": a.global.round, "digest": statement.digest, "bytes": len,
            "localSteps": statement.local_steps})
    );
    Ok(())
}

/// The sha256 of the dataset index a local run trained on.
async fn index_digest(dataset_uri: &str) -> Result<String> {
    let loc = Location::open(dataset_uri)?;
    let index = loc
        .get_bounded(radfm_data::index::INDEX, 256 << 20)
        .await?
        .with_context(|| format!("{dataset_uri} has no {}", radfm_data::index::INDEX))?;
    Ok(weights::digest(&index))
}

/// The contribution statement of `a`'s site: the flags, else what the checkpoint says.
async fn statement_of(
    a: &ContributeArgs,
    run: Option<&LocalRun>,
    federation: &str,
    base_digest: String,
    update_digest: String,
) -> Result<Contribution> {
    let need = |flag: &str| {
        format!("--{flag} is needed when --local is a safetensors file (a checkpoint says it)")
    };
    let dataset_index_digest = match (&a.dataset_index_digest, run) {
        (Some(d), _) => d.clone(),
        (None, Some(r)) => index_digest(&r.dataset_uri).await?,
        (None, None) => bail!(need("dataset-index-digest")),
    };
    Ok(Contribution {
        format: FORMAT.into(),
        federation: federation.to_string(),
        site: a.site.clone(),
        round: a.global.round,
        base_digest,
        update_digest,
        samples: a
            .samples
            .or(run.map(|r| r.samples))
            .with_context(|| need("samples"))?,
        steps: a
            .steps
            .or(run.map(|r| r.steps))
            .with_context(|| need("steps"))?,
        dataset_index_digest,
        local_loss: a.local_loss.or(run.and_then(|r| r.loss)).unwrap_or(0.0),
    })
}

async fn contribute(a: ContributeArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let key = crate::validate::read_signing_key(&a.key_file)?;
    let (global_bytes, statement) = a.global.fetch(&ex).await?;
    let round = a.global.round;
    let global = Weights::from_safetensors(&global_bytes, "the global model")?;
    let (local, run) = local_weights(&a.local).await?;
    let update = local.minus(&global, &a.local)?;
    let norm = update.norm();
    let bound = a.norm_bound.unwrap_or(statement.norm_bound);
    let update = privacy::clip(&update, bound);
    let bytes = update.to_safetensors(a.precision.into())?;
    let c = statement_of(
        &a,
        run.as_ref(),
        &ex.federation,
        statement.digest,
        weights::digest(&bytes),
    )
    .await?;
    let signed = c.sign(&key);
    if !ex.contribute(&a.site, round, &bytes, &signed).await? {
        bail!("site {} already contributed to round {}", a.site, round);
    }
    let sent = bytes.len() + serde_json::to_vec(&signed)?.len();
    println!(
        "{}",
        serde_json::json!({"site": a.site, "round": round, "norm": norm,
            "clipped": norm > bound, "samples": c.samples, "steps": c.steps,
            "bytesSent": sent})
    );
    Ok(())
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
        norm_bound: a.schedule.norm_bound,
        sites: listed,
    };
    let privacy = match (a.dp_clip, a.dp_noise_multiplier) {
        (Some(clip), Some(noise_multiplier)) => Some((
            Privacy {
                clip,
                noise_multiplier,
            },
            a.dp_delta,
        )),
        _ => None,
    };
    let closing = Closing {
        aggregator: a.aggregator,
        privacy,
        min_sites: a.min_sites,
        precision: a.precision.into(),
        schedule: (&a.schedule).into(),
    };
    let record = ex.close_round(&round, &global, &closing, &hub).await?;
    println!("{}", serde_json::to_string(&record)?);
    Ok(())
}

/// The registry's record of the federation's rounds, from the hub's signed round records.
#[cfg(feature = "torch")]
async fn lineage(
    ex: &Exchange,
    a: &RegisterArgs,
    hub_key: &str,
    result_digest: &str,
) -> Result<radfm_registry::federated::FederatedLineage> {
    use radfm_registry::federated as reg;
    let mut rounds = Vec::new();
    for round in 1..=a.last_round {
        let r = ex
            .round_record(round, Some(hub_key))
            .await?
            .with_context(|| format!("round {round} has no record: the federation is not done"))?;
        rounds.push(r);
    }
    Ok(reg::FederatedLineage {
        federation: ex.federation.clone(),
        exchange: ex.location.child_uri(""),
        hub_key: hub_key.to_string(),
        result_digest: result_digest.to_string(),
        rounds,
    })
}

#[cfg(feature = "torch")]
async fn register(a: RegisterArgs) -> Result<()> {
    if a.alias == "production" {
        bail!("--alias production: promotion is the PromotionPolicy gate's decision");
    }
    let hub_key = match (&a.hub_key, &a.key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(f)) => report::public_hex(&crate::validate::read_signing_key(f)?),
        (None, None) => bail!("--hub-key or --key-file is needed to check the hub's records"),
    };
    let ex = a.exchange.open()?;
    let registry = radfm_registry::Registry::open(&a.registry)?;
    let result_round = a.last_round + 1;
    let (bytes, statement) = ex
        .fetch_global(result_round, &hub_key)
        .await?
        .with_context(|| format!("round {} has no result yet", a.last_round))?;
    if statement.opens_training() {
        bail!(
            "the model of round {result_round} opens a training round: round {} is not the last",
            a.last_round
        );
    }
    let uid = radfm_registry::federated::result_uid(&ex.federation, &statement.digest);
    if let Some(v) = registry.find_by_job(&a.model, &uid).await? {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "version": v.version, "registered": false})
        );
        return Ok(());
    }
    let lineage = lineage(&ex, &a, &hub_key, &statement.digest).await?;
    let steps = lineage.rounds.len() as i64 * statement.local_steps as i64;
    let source = ex
        .location
        .child_uri(&format!("rounds/{result_round:05}/global.safetensors"));
    let card = radfm_trainer::export::export_model(&bytes, &source, &a.base, steps, &a.out).await?;
    let out = Location::open(&a.out)?;
    let spec = radfm_registry::NewVersion {
        weights_uri: out.child_uri(radfm_api::export_files::WEIGHTS),
        weights_sha256: card.weights_sha256.clone(),
        parent: a.parent,
        job_name: Some(ex.federation.clone()),
        job_uid: Some(uid),
        data: radfm_registry::DataWindow::default(),
        config: serde_json::to_value(&card)?,
        code_version: card.code_version.clone(),
        metrics: BTreeMap::from([("steps".to_string(), steps as f64)]),
        federated: Some(lineage),
        trigger: None,
    };
    let by = format!("federation {}", ex.federation);
    let reason = format!(
        "federated training {}: {} rounds",
        ex.federation, a.last_round
    );
    let v = registry
        .register(&a.model, spec, &by, &reason, Some(&a.alias))
        .await?;
    println!(
        "{}",
        serde_json::json!({"model": a.model, "version": v.version, "alias": a.alias, "registered": true})
    );
    Ok(())
}

#[cfg(not(feature = "torch"))]
async fn register(_a: RegisterArgs) -> Result<()> {
    bail!("exporting a federated model needs radfm built with the torch feature")
}

async fn status(a: StatusArgs) -> Result<()> {
    let ex = a.exchange.open()?;
    let mut round = 1;
    while let Some(s) = ex.global_statement(round, Some(&a.hub_key)).await? {
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
