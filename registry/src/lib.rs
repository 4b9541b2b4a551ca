//! radfm's model registry on object storage: versions with lineage, aliases with history, and an
//! append-only event log — the record of when, how and why a model changed.
//!
//! Every object is written once with a create-only put and never changed:
//!
//! ```text
//! <registry>/models/<model>/versions/000003.json   immutable version manifest
//! <registry>/models/<model>/events/000000007.json  event 7: registered, alias moved, ...
//! ```
//!
//! Version numbers and event sequence numbers are claimed by creating the object: of two
//! writers racing for the same number exactly one succeeds, and the other re-reads the state and
//! retries with the next number. Alias positions are not stored in mutable files; they are
//! derived from the event log, so an alias move and its history entry are one atomic write, and
//! a move conditioned on the alias's current target (compare-and-set) cannot be lost or doubled
//! by a concurrent writer. This needs only create-only puts, which local folders, S3
//! (`If-None-Match`), GCS and Azure all provide.
//!
//! The log is tamper-evident: every event carries the sha256 of the previous event's stored
//! bytes (`prev`), and a writer holding a signing key (the operator's, or a person's with
//! `RADFM_REGISTRY_KEY_FILE`) signs each event with ed25519. [`Registry::verify`] walks the chain:
//! someone with write access to the bucket who deletes, edits or reorders events, or appends
//! without a trusted key, is detected.
//!
//! Who may change what is recorded too: a model belongs to the namespace that first claimed it
//! ([`EventKind::Claimed`]), and one PromotionPolicy governs it ([`EventKind::Governed`]); the
//! alias that policy promotes to is the gate's alone ([`check_alias_free`]).
#![deny(missing_docs)]

pub mod federated;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use radfm_data::store::Location;

/// Errors of the registry, each naming the model, version or object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Object-store I/O failed.
    #[error(transparent)]
    Store(#[from] radfm_data::Error),
    /// A registry object is unreadable.
    #[error("{uri}: {reason}")]
    Corrupt {
        /// The object.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// A model, version or alias does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A conditional alias move found the alias elsewhere.
    #[error("alias {alias} of {model} is at {actual}, not {expected}")]
    Conflict {
        /// Model.
        model: String,
        /// Alias.
        alias: String,
        /// What the caller expected.
        expected: String,
        /// Where it is.
        actual: String,
    },
    /// A name or argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this to this model (another namespace owns it, another policy
    /// governs it, or the alias is the gate's).
    #[error("{0}")]
    Forbidden(String),
}

/// Result alias of the registry.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The data a version was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DataWindow {
    /// Dataset folder URI (its index.json).
    pub index_uri: String,
    /// First shard sequence number.
    pub first_seq: u64,
    /// Last shard sequence number.
    pub last_seq: u64,
    /// Every shard trained on, with its sha256.
    #[serde(default)]
    pub shards: Vec<ShardRef>,
    /// Of those, the earlier shards replayed against forgetting (continual training).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replayed: Vec<u64>,
}

/// File names of an exported model folder.
pub use radfm_api::export_files as export;

/// The part of a model card the registry records (the card itself is kept as the version's
/// `config`).
#[derive(Debug, Deserialize)]
struct CardSummary {
    dataset: CardData,
    steps: i64,
    final_loss: Option<f64>,
    weights_sha256: String,
    code_version: String,
}

#[derive(Debug, Deserialize)]
struct CardData {
    uri: String,
    first_seq: u64,
    last_seq: u64,
    #[serde(default)]
    selection: Option<String>,
}

/// A version's manifest from an exported model folder: the model card, and the sha256 of every
/// shard trained on from the dataset index. Parent, job and replay are left for the caller.
pub async fn from_export(uri: &str) -> Result<NewVersion> {
    let loc = Location::open(uri)?;
    let card_uri = loc.child_uri(export::CARD);
    let bytes = loc
        .get_bounded(export::CARD, MAX_DOCUMENT_BYTES)
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!("{card_uri} does not exist: not an exported model"))
        })?;
    let config: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        uri: card_uri.clone(),
        reason: e.to_string(),
    })?;
    let card: CardSummary = serde_json::from_value(config.clone()).map_err(|e| Error::Corrupt {
        uri: card_uri.clone(),
        reason: e.to_string(),
    })?;
    let data = &card.dataset;
    let selected: Option<Vec<u64>> = match &data.selection {
        None => None,
        Some(t) => {
            Some(
                radfm_api::trainingjob::parse_shards(t).map_err(|reason| Error::Corrupt {
                    uri: card_uri.clone(),
                    reason: format!("dataset.selection: {reason}"),
                })?,
            )
        }
    };
    let index = radfm_data::DatasetIndex::load(&Location::open(&data.uri)?).await?;
    let shards: Vec<ShardRef> = index
        .shards
        .iter()
        .filter(|s| match &selected {
            Some(sel) => sel.contains(&s.seq),
            None => s.seq >= data.first_seq && s.seq <= data.last_seq,
        })
        .map(|s| ShardRef {
            seq: s.seq,
            sha256: s.sha256.clone(),
        })
        .collect();
    let mut metrics = BTreeMap::new();
    if let Some(l) = card.final_loss {
        metrics.insert("final_loss".to_string(), l);
    }
    metrics.insert("steps".to_string(), card.steps as f64);
    Ok(NewVersion {
        weights_uri: loc.child_uri(export::WEIGHTS),
        weights_sha256: card.weights_sha256,
        parent: None,
        job_name: None,
        job_uid: None,
        data: DataWindow {
            index_uri: data.uri.clone(),
            first_seq: data.first_seq,
            last_seq: data.last_seq,
            shards,
            replayed: Vec::new(),
        },
        config,
        code_version: card.code_version,
        metrics,
        federated: None,
        trigger: None,
    })
}

/// One shard of a data window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRef {
    /// Sequence number in the dataset index.
    pub seq: u64,
    /// sha256 of the shard.
    pub sha256: String,
}

/// What registering a version needs (the registry assigns the number and time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NewVersion {
    /// Exported model folder URI.
    pub weights_uri: String,
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// Version it was trained from (initFrom), if any.
    pub parent: Option<u64>,
    /// TrainingJob name.
    pub job_name: Option<String>,
    /// TrainingJob uid.
    pub job_uid: Option<String>,
    /// Training data.
    pub data: DataWindow,
    /// Resolved training configuration.
    pub config: serde_json::Value,
    /// radfm version that trained it.
    pub code_version: String,
    /// Final metrics (loss, ...).
    pub metrics: BTreeMap<String, f64>,
    /// For a federated model: its rounds and every site's contribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<federated::FederatedLineage>,
    /// For a continual-training run: which trigger rule created it, with the drifting sites'
    /// evidence where drift did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<radfm_api::continual::RunTrigger>,
}

/// An immutable version manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// Model name.
    pub model: String,
    /// Version number, from 1.
    pub version: u64,
    /// When it was registered (RFC 3339).
    pub created: String,
    /// Who registered it.
    pub by: String,
    /// Everything else.
    #[serde(flatten)]
    pub spec: NewVersion,
}

/// What an event records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum EventKind {
    /// A version was registered.
    Registered {
        /// The version.
        version: u64,
    },
    /// An alias moved (from None: created).
    AliasMoved {
        /// The alias.
        alias: String,
        /// Previous target.
        from: Option<u64>,
        /// New target.
        to: u64,
    },
    /// A decision without a move (for example a rejected promotion), kept for the record.
    Note {
        /// Version concerned.
        version: Option<u64>,
    },
    /// The model belongs to a namespace: only that namespace's resources register to it or
    /// govern it (the first claim counts).
    Claimed {
        /// The owning namespace.
        namespace: String,
    },
    /// One PromotionPolicy governs the model: the alias it promotes to is the gate's alone.
    Governed {
        /// The policy's namespace.
        namespace: String,
        /// The policy's name.
        policy: String,
        /// The alias the policy moves (`production`).
        production_alias: String,
    },
    /// The governing policy gave the model up (a person's decision, for a handover to another
    /// policy of the owning namespace).
    Released {
        /// The policy's namespace.
        namespace: String,
        /// The policy's name.
        policy: String,
    },
}

impl std::fmt::Display for EventKind {
    /// In words: `registered v3`, `production: v2 -> v3`, `note on v3`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventKind::Registered { version } => write!(f, "registered v{version}"),
            EventKind::AliasMoved { alias, from, to } => match from {
                Some(from) => write!(f, "{alias}: v{from} -> v{to}"),
                None => write!(f, "{alias}: (new) -> v{to}"),
            },
            EventKind::Note { version: Some(v) } => write!(f, "note on v{v}"),
            EventKind::Note { version: None } => write!(f, "note"),
            EventKind::Claimed { namespace } => write!(f, "claimed by namespace {namespace}"),
            EventKind::Governed {
                namespace,
                policy,
                production_alias,
            } => write!(
                f,
                "governed by PromotionPolicy {namespace}/{policy} ({production_alias})"
            ),
            EventKind::Released { namespace, policy } => {
                write!(f, "released by PromotionPolicy {namespace}/{policy}")
            }
        }
    }
}

/// One entry of a model's append-only log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// When (RFC 3339).
    pub time: String,
    /// Who (user, controller, site).
    pub by: String,
    /// Why, in words.
    pub reason: String,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
    /// sha256 (hex) of the previous event's stored bytes; None for the first event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// The signer's ed25519 public key (hex), when signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// ed25519 signature (hex) of the event serialized without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Event {
    /// The bytes a signature covers: the event as JSON without its signature.
    fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Event {
            signature: None,
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).expect("events serialise")
    }
}

/// How often a writer re-reads and retries a number another writer took, before giving up
/// (a store that refuses every create would otherwise keep it looping).
const MAX_CLAIM_ATTEMPTS: usize = 64;
/// Largest registry document read (event, version, model card, approval, decision): whoever can
/// write the bucket cannot make a reader, the operator included, allocate more.
pub const MAX_DOCUMENT_BYTES: usize = 16 << 20;

fn gave_up(model: &str, what: &str) -> Error {
    Error::Invalid(format!(
        "{model}: could not claim {what} in {MAX_CLAIM_ATTEMPTS} attempts (every create-only \
         put was refused: many concurrent writers, or a store that refuses creates)"
    ))
}

/// Environment variable naming a file with the hex ed25519 seed every append is signed with.
pub const KEY_FILE_ENV: &str = "RADFM_REGISTRY_KEY_FILE";

/// The registry at a URI.
#[derive(Clone, Debug)]
pub struct Registry {
    loc: Location,
    signer: Option<ed25519_dalek::SigningKey>,
}

/// A signing key from the hex seed in `path`.
pub fn read_key(path: &std::path::Path) -> Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: not a 32-byte hex ed25519 seed",
                path.display()
            ))
        })?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// A public key from hex.
pub fn public_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Invalid(format!("public key {hex_key:?} is not 32 hex bytes")))?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|e| Error::Invalid(format!("public key {hex_key:?}: {e}")))
}

/// What [`Registry::verify`] found wrong with one event (or a missing one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainProblem {
    /// The event's sequence number.
    pub seq: u64,
    /// What is wrong.
    pub problem: String,
}

/// A PromotionPolicy's claim over a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Governor {
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub policy: String,
    /// The alias it promotes to.
    pub production_alias: String,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {name:?} must be 1-63 characters of a-z, 0-9 and -"
        )))
    }
}

impl Registry {
    /// Opens (or starts) a registry at `uri`.
    /// Appends are signed with the key in [`KEY_FILE_ENV`] when it is set.
    pub fn open(uri: &str) -> Result<Registry> {
        Self::open_with(uri, radfm_data::store::settings_for(uri, std::env::vars()))
    }

    /// [`Registry::open`] with the store settings taken from `vars` (a process that also reads
    /// another store with other credentials).
    pub fn open_with(
        uri: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Registry> {
        let signer = match std::env::var_os(KEY_FILE_ENV) {
            Some(path) if !path.is_empty() => Some(read_key(std::path::Path::new(&path))?),
            _ => None,
        };
        Ok(Registry {
            loc: Location::open_with(uri, vars)?,
            signer,
        })
    }

    /// The same registry, signing appends with `key`.
    pub fn with_signer(mut self, key: ed25519_dalek::SigningKey) -> Registry {
        self.signer = Some(key);
        self
    }

    /// The registry's URI.
    pub fn uri(&self) -> &str {
        &self.loc.uri
    }

    fn version_name(model: &str, v: u64) -> String {
        format!("models/{model}/versions/{v:06}.json")
    }

    fn event_name(model: &str, seq: u64) -> String {
        format!("models/{model}/events/{seq:09}.json")
    }

    /// The names (without `.json`) of the JSON objects under `prefix`, sorted.
    async fn json_names(&self, prefix: &str) -> Result<Vec<String>> {
        use futures::TryStreamExt;
        let metas: Vec<object_store::ObjectMeta> = self
            .loc
            .store
            .list(Some(&self.loc.child(prefix)))
            .try_collect()
            .await
            .map_err(|e| {
                Error::Store(radfm_data::Error::Store {
                    uri: self.loc.child_uri(prefix),
                    source: e,
                })
            })?;
        let mut names: Vec<String> = metas
            .iter()
            .filter_map(|m| Some(m.location.filename()?.strip_suffix(".json")?.to_string()))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn numbers(&self, prefix: &str) -> Result<Vec<u64>> {
        let mut n: Vec<u64> = self
            .json_names(prefix)
            .await?
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect();
        n.sort_unstable();
        Ok(n)
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        match self.loc.get_bounded(name, MAX_DOCUMENT_BYTES).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    uri: self.loc.child_uri(name),
                    reason: e.to_string(),
                }),
        }
    }

    /// Model names, sorted.
    pub async fn models(&self) -> Result<Vec<String>> {
        let prefix = self.loc.child("models");
        let listed = self
            .loc
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| {
                Error::Store(radfm_data::Error::Store {
                    uri: self.loc.child_uri("models"),
                    source: e,
                })
            })?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every version of a model, oldest first.
    pub async fn versions(&self, model: &str) -> Result<Vec<Version>> {
        check_name("model", model)?;
        let mut out = Vec::new();
        for v in self.numbers(&format!("models/{model}/versions")).await? {
            out.push(self.version(model, v).await?);
        }
        Ok(out)
    }

    /// One version.
    pub async fn version(&self, model: &str, v: u64) -> Result<Version> {
        check_name("model", model)?;
        self.read(&Self::version_name(model, v))
            .await?
            .ok_or_else(|| Error::NotFound(format!("{model} has no version {v}")))
    }

    /// The whole event log of a model, in order.
    pub async fn events(&self, model: &str) -> Result<Vec<Event>> {
        check_name("model", model)?;
        let mut out = Vec::new();
        for seq in self.numbers(&format!("models/{model}/events")).await? {
            let uri = || self.loc.child_uri(&Self::event_name(model, seq));
            let e: Event = self
                .read(&Self::event_name(model, seq))
                .await?
                .ok_or_else(|| Error::Corrupt {
                    uri: uri(),
                    reason: "listed but unreadable".into(),
                })?;
            // The next number is derived from the last event: one that lies about its number
            // would send every writer to an existing slot forever.
            if e.seq != seq {
                return Err(Error::Corrupt {
                    uri: uri(),
                    reason: format!("stored as event {seq} but says it is event {}", e.seq),
                });
            }
            out.push(e);
        }
        Ok(out)
    }

    /// sha256 (hex) of event `seq`'s stored bytes.
    async fn event_digest(&self, model: &str, seq: u64) -> Result<String> {
        use sha2::Digest;
        let name = Self::event_name(model, seq);
        let bytes = self
            .loc
            .get_bounded(&name, MAX_DOCUMENT_BYTES)
            .await?
            .ok_or_else(|| Error::Corrupt {
                uri: self.loc.child_uri(&name),
                reason: "listed but unreadable".into(),
            })?;
        Ok(hex::encode(sha2::Sha256::digest(&bytes)))
    }

    /// Walks the event log of `model` as a chain: sequence numbers from 1 without gaps, each
    /// event naming the sha256 of the one before, each signed by one of `trusted` (hex public
    /// keys). Returns every problem found (none: the history is what trusted writers wrote).
    pub async fn verify(&self, model: &str, trusted: &[String]) -> Result<Vec<ChainProblem>> {
        use sha2::Digest;
        check_name("model", model)?;
        let trusted: Vec<ed25519_dalek::VerifyingKey> = trusted
            .iter()
            .map(|k| public_key(k))
            .collect::<Result<_>>()?;
        let mut problems = Vec::new();
        let mut prev_digest: Option<String> = None;
        let mut expected = 1;
        for seq in self.numbers(&format!("models/{model}/events")).await? {
            let mut found = |problem: String| problems.push(ChainProblem { seq, problem });
            if seq != expected {
                found(format!("events {expected}..{} are missing", seq - 1));
            }
            expected = seq + 1;
            let name = Self::event_name(model, seq);
            let Some(bytes) = self.loc.get_bounded(&name, MAX_DOCUMENT_BYTES).await? else {
                found("listed but unreadable".into());
                continue;
            };
            let digest = hex::encode(sha2::Sha256::digest(&bytes));
            match serde_json::from_slice::<Event>(&bytes) {
                Err(e) => found(format!("not an event: {e}")),
                Ok(e) => {
                    for p in chain_problems(&e, seq, prev_digest.as_deref(), &trusted) {
                        found(p);
                    }
                }
            }
            prev_digest = Some(digest);
        }
        Ok(problems)
    }

    /// Claims `model` for `namespace` (the first claim counts); refuses when another namespace
    /// owns it.
    /// Returns the model's log as it stands after the claim (read once where the model is
    /// already this namespace's).
    pub async fn claim(&self, model: &str, namespace: &str, by: &str) -> Result<Vec<Event>> {
        let log = self.events(model).await?;
        match owner_of(&log) {
            Some(owner) if owner == namespace => return Ok(log),
            Some(owner) => return Err(not_owner(model, owner, namespace)),
            None => {}
        }
        let reason = format!("model {model} belongs to namespace {namespace}");
        self.append(model, by, &reason, |log| match owner_of(log) {
            Some(owner) if owner != namespace => Err(not_owner(model, owner, namespace)),
            _ => Ok(EventKind::Claimed {
                namespace: namespace.into(),
            }),
        })
        .await?;
        self.events(model).await
    }

    /// Records that PromotionPolicy `namespace/policy` governs `model`, promoting to
    /// `production_alias`; refuses when the model belongs to another namespace or another policy
    /// governs it. A model nobody owns yet is claimed for the policy's namespace.
    pub async fn govern(&self, model: &str, g: &Governor, by: &str) -> Result<()> {
        let log = self.claim(model, &g.namespace, by).await?;
        match governor_of(&log) {
            Some(current) if current == *g => return Ok(()),
            Some(current) => return Err(governed_elsewhere(model, &current)),
            None => {}
        }
        let reason = format!(
            "PromotionPolicy {}/{} governs {model}; {} moves only through its gate",
            g.namespace, g.policy, g.production_alias
        );
        self.append(model, by, &reason, |log| match governor_of(log) {
            Some(current) if current != *g => Err(governed_elsewhere(model, &current)),
            _ => Ok(EventKind::Governed {
                namespace: g.namespace.clone(),
                policy: g.policy.clone(),
                production_alias: g.production_alias.clone(),
            }),
        })
        .await
        .map(|_| ())
    }

    /// Ends the current governing policy's claim (a handover: the next PromotionPolicy of the
    /// owning namespace to reconcile governs the model).
    pub async fn release(&self, model: &str, by: &str, reason: &str) -> Result<Governor> {
        let current = governor_of(&self.events(model).await?)
            .ok_or_else(|| Error::NotFound(format!("no PromotionPolicy governs {model}")))?;
        let g = current.clone();
        self.append(model, by, reason, move |log| match governor_of(log) {
            Some(now) if now == g => Ok(EventKind::Released {
                namespace: g.namespace.clone(),
                policy: g.policy.clone(),
            }),
            _ => Err(Error::Conflict {
                model: model.into(),
                alias: "governance".into(),
                expected: format!("{}/{}", g.namespace, g.policy),
                actual: "changed meanwhile".into(),
            }),
        })
        .await?;
        Ok(current)
    }

    /// Where every alias points, from the event log.
    pub async fn aliases(&self, model: &str) -> Result<BTreeMap<String, u64>> {
        Ok(aliases_of(&self.events(model).await?))
    }

    /// Resolves "3", "v3" or an alias name to a version number.
    pub async fn resolve(&self, model: &str, what: &str) -> Result<u64> {
        if let Ok(v) = what.trim_start_matches('v').parse::<u64>() {
            return Ok(v);
        }
        self.aliases(model)
            .await?
            .get(what)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("{model} has no alias {what:?}")))
    }

    /// Appends an event whose content may depend on the current log: `make` sees the log and
    /// returns the event (or an error); on a lost race for the sequence number the log is
    /// re-read and `make` asked again.
    async fn append(
        &self,
        model: &str,
        by: &str,
        reason: &str,
        make: impl Fn(&[Event]) -> Result<EventKind>,
    ) -> Result<Event> {
        self.loc.require_conditional_writes().await?;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let log = self.events(model).await?;
            let kind = make(&log)?;
            let seq = log.last().map_or(1, |e| e.seq + 1);
            let prev = match seq {
                1 => None,
                _ => Some(self.event_digest(model, seq - 1).await?),
            };
            let mut e = Event {
                seq,
                time: jiff::Timestamp::now().to_string(),
                by: by.into(),
                reason: reason.into(),
                kind,
                prev,
                signer: None,
                signature: None,
            };
            if let Some(key) = &self.signer {
                use ed25519_dalek::Signer;
                e.signer = Some(hex::encode(key.verifying_key().to_bytes()));
                e.signature = Some(hex::encode(key.sign(&e.signed_bytes()).to_bytes()));
            }
            let body = serde_json::to_vec_pretty(&e).expect("events serialise");
            if self
                .loc
                .put_new(&Self::event_name(model, e.seq), body)
                .await?
            {
                return Ok(e);
            }
        }
        Err(gave_up(model, "an event number"))
    }

    /// Registers a new version (number assigned here) and records it in the log; with `alias`,
    /// also moves that alias to it in the same step.
    pub async fn register(
        &self,
        model: &str,
        spec: NewVersion,
        by: &str,
        reason: &str,
        alias: Option<&str>,
    ) -> Result<Version> {
        check_name("model", model)?;
        if let Some(a) = alias {
            check_name("alias", a)?;
        }
        if let Some(p) = spec.parent {
            self.version(model, p).await?;
        }
        self.loc.require_conditional_writes().await?;
        let mut claimed = None;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let next = self
                .numbers(&format!("models/{model}/versions"))
                .await?
                .last()
                .map_or(1, |v| v + 1);
            let v = Version {
                model: model.into(),
                version: next,
                created: jiff::Timestamp::now().to_string(),
                by: by.into(),
                spec: spec.clone(),
            };
            let body = serde_json::to_vec_pretty(&v).expect("versions serialise");
            if self
                .loc
                .put_new(&Self::version_name(model, next), body)
                .await?
            {
                claimed = Some(v);
                break;
            }
        }
        let version = claimed.ok_or_else(|| gave_up(model, "a version number"))?;
        let n = version.version;
        self.append(model, by, reason, |_| {
            Ok(EventKind::Registered { version: n })
        })
        .await?;
        if let Some(a) = alias {
            self.move_alias(model, a, n, None, by, reason).await?;
        }
        Ok(version)
    }

    /// Moves `alias` to version `to`. With `expect`, only if the alias is currently at that
    /// version (compare-and-set; `Some(0)` means "the alias does not exist yet").
    pub async fn move_alias(
        &self,
        model: &str,
        alias: &str,
        to: u64,
        expect: Option<u64>,
        by: &str,
        reason: &str,
    ) -> Result<Event> {
        check_name("alias", alias)?;
        self.version(model, to).await?;
        self.append(model, by, reason, |log| {
            let from = aliases_of(log).get(alias).copied();
            if let Some(want) = expect
                && from.unwrap_or(0) != want
            {
                return Err(Error::Conflict {
                    model: model.into(),
                    alias: alias.into(),
                    expected: version_text(Some(want)),
                    actual: version_text(from),
                });
            }
            Ok(EventKind::AliasMoved {
                alias: alias.into(),
                from,
                to,
            })
        })
        .await
    }

    /// Moves `alias` back to where it was before its last move.
    pub async fn rollback(
        &self,
        model: &str,
        alias: &str,
        by: &str,
        reason: &str,
    ) -> Result<Event> {
        let log = self.events(model).await?;
        let (current, previous) = alias_history(&log, alias)
            .last()
            .map(|&(from, to)| (to, from))
            .ok_or_else(|| Error::NotFound(format!("{model} has no alias {alias:?}")))?;
        let previous = previous.ok_or_else(|| {
            Error::Invalid(format!(
                "alias {alias} of {model} has never pointed elsewhere: nothing to roll back to"
            ))
        })?;
        self.move_alias(model, alias, previous, Some(current), by, reason)
            .await
    }

    /// Records a decision that moved nothing.
    pub async fn note(
        &self,
        model: &str,
        version: Option<u64>,
        by: &str,
        reason: &str,
    ) -> Result<Event> {
        self.append(model, by, reason, |_| Ok(EventKind::Note { version }))
            .await
    }

    fn report_prefix(model: &str, version: u64) -> String {
        format!("models/{model}/reports/v{version:06}")
    }

    /// Stores a site's signed validation report of a version (the site's latest report
    /// replaces its earlier one); returns its URI.
    pub async fn put_report(
        &self,
        model: &str,
        version: u64,
        site: &str,
        signed: Vec<u8>,
    ) -> Result<String> {
        check_name("model", model)?;
        check_name("site", site)?;
        self.version(model, version).await?;
        let name = format!("{}/{site}.json", Self::report_prefix(model, version));
        self.loc.put(&name, signed).await?;
        Ok(self.loc.child_uri(&name))
    }

    /// The sites that stored a report of a version, sorted (a listing; nothing is read).
    pub async fn report_sites(&self, model: &str, version: u64) -> Result<Vec<String>> {
        check_name("model", model)?;
        self.json_names(&Self::report_prefix(model, version)).await
    }

    /// Every stored report of a version as (site, URI, bytes), by site.
    pub async fn reports(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Vec<(String, String, Vec<u8>)>> {
        let prefix = Self::report_prefix(model, version);
        let mut out = Vec::new();
        for site in self.report_sites(model, version).await? {
            let name = format!("{prefix}/{site}.json");
            if let Some(bytes) = self.loc.get_bounded(&name, MAX_DOCUMENT_BYTES).await? {
                out.push((site, self.loc.child_uri(&name), bytes.to_vec()));
            }
        }
        Ok(out)
    }

    fn monitor_prefix(model: &str, version: u64) -> String {
        format!("models/{model}/monitoring/v{version:06}")
    }

    /// Stores a site's signed monitor report of a deployed version (the site's latest look
    /// replaces its earlier one); returns its URI.
    pub async fn put_monitor_report(
        &self,
        model: &str,
        version: u64,
        site: &str,
        signed: Vec<u8>,
    ) -> Result<String> {
        check_name("model", model)?;
        check_name("site", site)?;
        self.version(model, version).await?;
        let name = format!("{}/{site}.json", Self::monitor_prefix(model, version));
        self.loc.put(&name, signed).await?;
        Ok(self.loc.child_uri(&name))
    }

    /// Every stored monitor report of a version as (site, URI, bytes), by site.
    pub async fn monitor_reports(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Vec<(String, String, Vec<u8>)>> {
        check_name("model", model)?;
        let prefix = Self::monitor_prefix(model, version);
        let mut out = Vec::new();
        for site in self.json_names(&prefix).await? {
            let name = format!("{prefix}/{site}.json");
            if let Some(bytes) = self.loc.get_bounded(&name, MAX_DOCUMENT_BYTES).await? {
                out.push((site, self.loc.child_uri(&name), bytes.to_vec()));
            }
        }
        Ok(out)
    }

    /// This site's stored monitor report of a version as (URI, bytes), if it has one.
    pub async fn monitor_report(
        &self,
        model: &str,
        version: u64,
        site: &str,
    ) -> Result<Option<(String, Vec<u8>)>> {
        check_name("model", model)?;
        check_name("site", site)?;
        let name = format!("{}/{site}.json", Self::monitor_prefix(model, version));
        Ok(self
            .loc
            .get_bounded(&name, MAX_DOCUMENT_BYTES)
            .await?
            .map(|bytes| (self.loc.child_uri(&name), bytes.to_vec())))
    }

    fn approval_prefix(model: &str, version: u64) -> String {
        format!("models/{model}/approvals/v{version:06}")
    }

    /// Stores a person's signed approval of a version (their later approval replaces an
    /// earlier one); returns its URI.
    pub async fn put_approval(
        &self,
        model: &str,
        version: u64,
        approver: &str,
        signed: Vec<u8>,
    ) -> Result<String> {
        check_name("model", model)?;
        if approver.is_empty()
            || approver.len() > 63
            || !approver
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            || approver.starts_with('.')
        {
            return Err(Error::Invalid(format!(
                "approver {approver:?} must be 1-63 characters of a-z, 0-9, - and ."
            )));
        }
        self.version(model, version).await?;
        let name = format!("{}/{approver}.json", Self::approval_prefix(model, version));
        self.loc.put(&name, signed).await?;
        Ok(self.loc.child_uri(&name))
    }

    /// Every stored approval of a version as (approver, bytes), by approver.
    pub async fn approvals(&self, model: &str, version: u64) -> Result<Vec<(String, Vec<u8>)>> {
        check_name("model", model)?;
        let prefix = Self::approval_prefix(model, version);
        let mut out = Vec::new();
        for approver in self.json_names(&prefix).await? {
            if let Some(bytes) = self
                .loc
                .get_bounded(&format!("{prefix}/{approver}.json"), MAX_DOCUMENT_BYTES)
                .await?
            {
                out.push((approver, bytes.to_vec()));
            }
        }
        Ok(out)
    }

    /// Stores a promotion decision (JSON) next to the event that recorded it; create-only.
    pub async fn put_decision(&self, model: &str, event_seq: u64, body: Vec<u8>) -> Result<String> {
        let name = format!("models/{model}/decisions/{event_seq:09}.json");
        self.loc.put_new(&name, body).await?;
        Ok(self.loc.child_uri(&name))
    }

    /// The decision recorded with event `event_seq`, if any.
    pub async fn decision(&self, model: &str, event_seq: u64) -> Result<Option<Vec<u8>>> {
        let name = format!("models/{model}/decisions/{event_seq:09}.json");
        Ok(self
            .loc
            .get_bounded(&name, MAX_DOCUMENT_BYTES)
            .await?
            .map(|b| b.to_vec()))
    }

    /// The version trained by the TrainingJob with this uid, if one was registered.
    pub async fn find_by_job(&self, model: &str, job_uid: &str) -> Result<Option<Version>> {
        let names = self.numbers(&format!("models/{model}/versions")).await?;
        for v in names.into_iter().rev() {
            let version = self.version(model, v).await?;
            if version.spec.job_uid.as_deref() == Some(job_uid) {
                return Ok(Some(version));
            }
        }
        Ok(None)
    }

    /// Whether `model` has any version.
    pub async fn exists(&self, model: &str) -> Result<bool> {
        check_name("model", model)?;
        Ok(!self
            .numbers(&format!("models/{model}/versions"))
            .await?
            .is_empty())
    }

    /// The chain of parents of a version, the version itself first.
    pub async fn lineage(&self, model: &str, v: u64) -> Result<Vec<Version>> {
        let mut chain = vec![self.version(model, v).await?];
        while let Some(p) = chain.last().and_then(|v| v.spec.parent) {
            if chain.iter().any(|v| v.version == p) {
                return Err(Error::Corrupt {
                    uri: self.loc.child_uri(&Self::version_name(model, p)),
                    reason: "lineage has a cycle".into(),
                });
            }
            chain.push(self.version(model, p).await?);
        }
        Ok(chain)
    }
}

fn version_text(v: Option<u64>) -> String {
    v.map_or("nothing".into(), |v| format!("version {v}"))
}

/// Alias targets after replaying `log`.
pub fn aliases_of(log: &[Event]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for e in log {
        if let EventKind::AliasMoved { alias, to, .. } = &e.kind {
            m.insert(alias.clone(), *to);
        }
    }
    m
}

/// The namespace that owns the model (its first claim).
pub fn owner_of(log: &[Event]) -> Option<&str> {
    log.iter().find_map(|e| match &e.kind {
        EventKind::Claimed { namespace } => Some(namespace.as_str()),
        _ => None,
    })
}

/// The PromotionPolicy that governs the model now: the last one recorded and not released.
pub fn governor_of(log: &[Event]) -> Option<Governor> {
    let mut current = None;
    for e in log {
        match &e.kind {
            EventKind::Governed {
                namespace,
                policy,
                production_alias,
            } if current.is_none() => {
                current = Some(Governor {
                    namespace: namespace.clone(),
                    policy: policy.clone(),
                    production_alias: production_alias.clone(),
                });
            }
            EventKind::Released { namespace, policy }
                if current.as_ref().is_some_and(|g: &Governor| {
                    &g.namespace == namespace && &g.policy == policy
                }) =>
            {
                current = None;
            }
            _ => {}
        }
    }
    current
}

/// Refuses `alias` when the model's governing policy owns it (only its gate moves it).
pub fn check_alias_free(log: &[Event], model: &str, alias: &str) -> Result<()> {
    match governor_of(log) {
        Some(g) if g.production_alias == alias => Err(Error::Forbidden(format!(
            "alias {alias} of {model} is moved only by the gate of PromotionPolicy {}/{}",
            g.namespace, g.policy
        ))),
        _ => Ok(()),
    }
}

fn not_owner(model: &str, owner: &str, namespace: &str) -> Error {
    Error::Forbidden(format!(
        "model {model} belongs to namespace {owner}, not {namespace}"
    ))
}

fn governed_elsewhere(model: &str, g: &Governor) -> Error {
    Error::Forbidden(format!(
        "model {model} is governed by PromotionPolicy {}/{}; one model has one governing policy",
        g.namespace, g.policy
    ))
}

/// What is wrong with one event of a chain: its sequence number, its link to the previous
/// event's digest, its signature.
fn chain_problems(
    e: &Event,
    seq: u64,
    prev_digest: Option<&str>,
    trusted: &[ed25519_dalek::VerifyingKey],
) -> Vec<String> {
    let mut problems = Vec::new();
    if e.seq != seq {
        problems.push(format!(
            "stored as event {seq} but says it is event {}",
            e.seq
        ));
    }
    if e.prev.as_deref() != prev_digest {
        problems.push(match (&e.prev, prev_digest) {
            (None, Some(_)) => "does not link to the previous event (unchained)".into(),
            _ => "its link does not match the previous event (history was changed)".into(),
        });
    }
    match (&e.signer, &e.signature) {
        (Some(signer), Some(sig)) => {
            let key = public_key(signer).ok();
            let sig = hex::decode(sig)
                .ok()
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .map(|b| ed25519_dalek::Signature::from_bytes(&b));
            let valid = key.zip(sig).is_some_and(|(k, s)| {
                use ed25519_dalek::Verifier;
                k.verify(&e.signed_bytes(), &s).is_ok()
            });
            if !valid {
                problems.push("its signature does not match (edited after signing)".into());
            } else if !trusted.iter().any(|t| key == Some(*t)) {
                problems.push(format!("signed by {signer}, which is not a trusted key"));
            }
        }
        _ => problems.push(format!("unsigned (written by {:?})", e.by)),
    }
    problems
}

/// (from, to) of every move of `alias`, in order.
pub fn alias_history(log: &[Event], alias: &str) -> Vec<(Option<u64>, u64)> {
    log.iter()
        .filter_map(|e| match &e.kind {
            EventKind::AliasMoved { alias: a, from, to } if a == alias => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(parent: Option<u64>) -> NewVersion {
        NewVersion {
            weights_uri: "file:///m".into(),
            weights_sha256: "ab".into(),
            parent,
            code_version: "test".into(),
            ..Default::default()
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn versions_are_numbered_aliases_move_and_roll_back_with_history() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            let v1 = r
                .register("cxr", spec(None), "ci", "first", Some("candidate"))
                .await
                .unwrap();
            assert_eq!(v1.version, 1);
            r.move_alias("cxr", "production", 1, Some(0), "ci", "initial")
                .await
                .unwrap();
            let v2 = r
                .register("cxr", spec(Some(1)), "ci", "retrained", Some("candidate"))
                .await
                .unwrap();
            r.move_alias("cxr", "production", 2, Some(1), "gate", "all sites passed")
                .await
                .unwrap();
            let a = r.aliases("cxr").await.unwrap();
            assert_eq!((a["candidate"], a["production"]), (2, 2));
            assert_eq!(r.resolve("cxr", "production").await.unwrap(), 2);
            let lineage: Vec<u64> = r
                .lineage("cxr", v2.version)
                .await
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect();
            assert_eq!(lineage, [2, 1]);
            let e = r
                .rollback("cxr", "production", "oncall", "site B regression")
                .await
                .unwrap();
            assert_eq!(
                e.kind,
                EventKind::AliasMoved {
                    alias: "production".into(),
                    from: Some(2),
                    to: 1
                }
            );
            let log = r.events("cxr").await.unwrap();
            let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
            assert_eq!(log.last().unwrap().reason, "site B regression");
            assert_eq!(r.models().await.unwrap(), ["cxr"]);
        });
    }

    #[test]
    fn each_sites_latest_monitor_report_is_kept_per_version_and_unknown_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            r.register("cxr", spec(None), "ci", "x", None)
                .await
                .unwrap();
            for (site, body) in [("north", "1"), ("south", "2"), ("north", "3")] {
                r.put_monitor_report("cxr", 1, site, body.into())
                    .await
                    .unwrap();
            }
            let kept: Vec<(String, Vec<u8>)> = r
                .monitor_reports("cxr", 1)
                .await
                .unwrap()
                .into_iter()
                .map(|(site, _, bytes)| (site, bytes))
                .collect();
            assert_eq!(
                kept,
                [
                    ("north".into(), b"3".to_vec()),
                    ("south".into(), b"2".to_vec())
                ]
            );
            assert!(
                r.put_monitor_report("cxr", 9, "north", vec![])
                    .await
                    .is_err()
            );
            assert!(
                r.put_monitor_report("cxr", 1, "../x", vec![])
                    .await
                    .is_err()
            );
            assert!(r.monitor_reports("cxr", 2).await.unwrap().is_empty());
            let (uri, bytes) = r.monitor_report("cxr", 1, "north").await.unwrap().unwrap();
            assert_eq!(
                (uri.ends_with("v000001/north.json"), bytes),
                (true, b"3".to_vec())
            );
            assert!(r.monitor_report("cxr", 1, "east").await.unwrap().is_none());
            assert!(r.monitor_report("cxr", 1, "../x").await.is_err());
        });
    }

    #[test]
    fn a_stale_conditional_move_is_refused_naming_where_the_alias_is() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            for _ in 0..3 {
                r.register("cxr", spec(None), "ci", "x", None)
                    .await
                    .unwrap();
            }
            r.move_alias("cxr", "production", 1, Some(0), "a", "x")
                .await
                .unwrap();
            r.move_alias("cxr", "production", 2, Some(1), "a", "x")
                .await
                .unwrap();
            let e = r
                .move_alias("cxr", "production", 3, Some(1), "b", "x")
                .await
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "alias production of cxr is at version 2, not version 1"
            );
            let e = r
                .move_alias("cxr", "production", 9, None, "b", "x")
                .await
                .unwrap_err();
            assert_eq!(e.to_string(), "cxr has no version 9");
            let e = r
                .register("Bad_Name", spec(None), "b", "x", None)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("a-z, 0-9"), "{e}");
        });
    }

    #[test]
    fn concurrent_writers_never_lose_or_duplicate_versions_or_moves() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().to_str().unwrap()).unwrap();
        let rt = rt();
        rt.block_on(r.register("cxr", spec(None), "ci", "base", None))
            .unwrap();
        rt.block_on(r.move_alias("cxr", "production", 1, Some(0), "ci", "x"))
            .unwrap();
        // 8 writers register at once; then 8 gates try to move production from 1 to their
        // version with compare-and-set: exactly one may win.
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let r = r.clone();
                rt.spawn(async move {
                    let v = r
                        .register("cxr", spec(Some(1)), &format!("w{i}"), "x", None)
                        .await
                        .unwrap();
                    r.move_alias(
                        "cxr",
                        "production",
                        v.version,
                        Some(1),
                        &format!("w{i}"),
                        "x",
                    )
                    .await
                })
            })
            .collect();
        let results: Vec<Result<Event>> = rt.block_on(async {
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.unwrap());
            }
            out
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(
            results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, Error::Conflict { .. }))
        );
        let versions: Vec<u64> = rt
            .block_on(r.versions("cxr"))
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, (1..=9).collect::<Vec<_>>());
        let log = rt.block_on(r.events("cxr")).unwrap();
        assert_eq!(
            log.iter()
                .filter(|e| matches!(e.kind, EventKind::Registered { .. }))
                .count(),
            9
        );
        assert_eq!(alias_history(&log, "production").len(), 2);
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }

    fn key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn public(seed: u8) -> String {
        hex::encode(key(seed).verifying_key().to_bytes())
    }

    /// Someone with write access to the bucket rewrites history; the chain shows where.
    #[test]
    fn the_signed_chain_detects_deleted_edited_and_foreign_events() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let r = Registry::open(root).unwrap().with_signer(key(1));
        let events = dir.path().join("models/cxr/events");
        let file = |seq: u64| events.join(format!("{seq:09}.json"));
        rt().block_on(async {
            r.register("cxr", spec(None), "ci", "first", Some("candidate"))
                .await
                .unwrap();
            r.move_alias("cxr", "production", 1, Some(0), "gate", "passed")
                .await
                .unwrap();
            r.note("cxr", Some(1), "gate", "held").await.unwrap();
            let trusted = [public(1)];
            assert_eq!(r.verify("cxr", &trusted).await.unwrap(), []);

            let untrusted = r.verify("cxr", &[public(9)]).await.unwrap();
            assert_eq!(untrusted.len(), 4, "{untrusted:?}");
            assert!(untrusted[0].problem.contains("not a trusted key"));

            // An edit: the production move now names another reason.
            let moved = std::fs::read_to_string(file(3)).unwrap();
            std::fs::write(file(3), moved.replace("passed", "approved by the board")).unwrap();
            let p = r.verify("cxr", &trusted).await.unwrap();
            assert_eq!(p.iter().map(|p| p.seq).collect::<Vec<_>>(), [3, 4], "{p:?}");
            assert!(p[0].problem.contains("signature does not match"), "{p:?}");
            assert!(p[1].problem.contains("link does not match"), "{p:?}");
            std::fs::write(file(3), moved).unwrap();
            assert_eq!(r.verify("cxr", &trusted).await.unwrap(), []);

            // A deletion of the last event and an append without the key.
            std::fs::remove_file(file(4)).unwrap();
            assert_eq!(r.verify("cxr", &trusted).await.unwrap(), []);
            let anyone = Registry::open(root).unwrap();
            anyone.note("cxr", None, "intruder", "x").await.unwrap();
            let p = r.verify("cxr", &trusted).await.unwrap();
            assert_eq!(p.len(), 1);
            assert!(
                p[0].problem.contains("unsigned (written by \"intruder\")"),
                "{p:?}"
            );

            // A deletion in the middle.
            std::fs::remove_file(file(2)).unwrap();
            let p = r.verify("cxr", &trusted).await.unwrap();
            assert!(
                p.iter()
                    .any(|p| p.seq == 3 && p.problem.contains("events 2..2 are missing")),
                "{p:?}"
            );
        });
    }

    #[test]
    fn a_model_has_one_owner_namespace_and_one_governing_policy_that_owns_its_alias() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().to_str().unwrap()).unwrap();
        let gate = |ns: &str, policy: &str| Governor {
            namespace: ns.into(),
            policy: policy.into(),
            production_alias: "production".into(),
        };
        rt().block_on(async {
            r.claim("cxr", "radiology", "ct").await.unwrap();
            r.claim("cxr", "radiology", "ct").await.unwrap();
            let e = r.claim("cxr", "cardiology", "ct").await.unwrap_err();
            assert!(matches!(e, Error::Forbidden(_)));
            assert_eq!(e.to_string(), "model cxr belongs to namespace radiology, not cardiology");

            let e = r.govern("cxr", &gate("cardiology", "chest"), "pp").await.unwrap_err();
            assert!(e.to_string().contains("belongs to namespace radiology"), "{e}");
            r.govern("cxr", &gate("radiology", "chest"), "pp").await.unwrap();
            r.govern("cxr", &gate("radiology", "chest"), "pp").await.unwrap();
            let e = r.govern("cxr", &gate("radiology", "other"), "pp").await.unwrap_err();
            assert!(e.to_string().contains("one model has one governing policy"), "{e}");

            let log = r.events("cxr").await.unwrap();
            assert_eq!(log.len(), 2, "repeated claims write nothing");
            assert_eq!(governor_of(&log), Some(gate("radiology", "chest")));

            // A handover: the governing policy is released, then another one of the same
            // namespace governs.
            let released = r.release("cxr", "alice", "replacing the chest policy").await.unwrap();
            assert_eq!(released, gate("radiology", "chest"));
            r.govern("cxr", &gate("radiology", "chest-v2"), "pp").await.unwrap();
            let log = r.events("cxr").await.unwrap();
            assert_eq!(governor_of(&log), Some(gate("radiology", "chest-v2")));
            r.release("cxr", "alice", "x").await.unwrap();
            assert!(matches!(r.release("cxr", "alice", "x").await, Err(Error::NotFound(_))));
            r.govern("cxr", &gate("radiology", "chest"), "pp").await.unwrap();
            let log = r.events("cxr").await.unwrap();
            assert!(check_alias_free(&log, "cxr", "candidate").is_ok());
            let e = check_alias_free(&log, "cxr", "production").unwrap_err();
            assert_eq!(
                e.to_string(),
                "alias production of cxr is moved only by the gate of PromotionPolicy radiology/chest"
            );
        });
    }

    /// An event whose body names another number than its object would send every writer to an
    /// existing slot forever: the log is refused as corrupt instead, naming the event.
    #[test]
    fn an_event_that_lies_about_its_number_is_refused_instead_of_looping() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            r.register("cxr", spec(None), "ci", "first", Some("candidate"))
                .await
                .unwrap();
            let last = dir.path().join("models/cxr/events/000000002.json");
            let text = std::fs::read_to_string(&last).unwrap();
            std::fs::write(&last, text.replace("\"seq\": 2", "\"seq\": 1")).unwrap();
            let e = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                r.note("cxr", None, "ci", "x"),
            )
            .await
            .expect("append returns instead of looping")
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains("stored as event 2 but says it is event 1"),
                "{e}"
            );
        });
    }
}
