//! Report text for the image–report objective: a tokenizer and a small transformer encoder.
//!
//! **Tokenizer.** A WordPiece tokenizer (the `tokenizers` crate, as BERT-style radiology encoders
//! such as CXR-BERT use) with BERT's normaliser (lower case, accents stripped) and
//! pre-tokeniser (whitespace and punctuation), whose vocabulary is learned from the training
//! reports themselves (whole frequent words, and every character as a fallback): a radiology
//! vocabulary differs from a general one, and the learned vocabulary ships with the model
//! (`tokenizer.json` beside the weights) so that the text encoder always meets the ids it was
//! trained with. Reports are cut to [`MAX_TOKENS`] tokens.
//!
//! **Encoder.** Token and learned position embeddings, transformer blocks (the ViT's blocks,
//! each token attending to the report's tokens only, never to padding), a final layer norm, and
//! the mean over the report's tokens.

use std::collections::{BTreeMap, BTreeSet};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    Tokenizer, TokenizerBuilder,
};

use crate::model::Block;
use crate::{Error, Result};

/// Tokens kept per report.
pub const MAX_TOKENS: usize = 64;
/// The padding token (id 0).
pub const PAD: &str = "[PAD]";
/// The token of unknown pieces.
pub const UNK: &str = "[UNK]";

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Field {
        field: "tokenizer".into(),
        reason: format!("{what}: {e}"),
    }
}

/// A trained report tokenizer.
pub struct ReportTokenizer(Tokenizer);

impl ReportTokenizer {
    /// Learns a WordPiece vocabulary of at most `vocab` entries from `reports`: the padding and
    /// unknown tokens, every character seen (alone and as a word's continuation `##c`, so that
    /// any word of those characters splits into known pieces), then the words seen at least
    /// twice, most frequent first (ties in alphabetical order). Counting in ordered maps makes
    /// the vocabulary a function of the reports alone: every process that learns it from the
    /// same reports gets the same ids (the `tokenizers` trainers break ties by hash-map order,
    /// which differs between processes).
    pub fn train(reports: impl Iterator<Item = String>, vocab: usize) -> Result<Self> {
        let (normalizer, pre) = (BertNormalizer::default(), BertPreTokenizer);
        let mut words: BTreeMap<String, u64> = BTreeMap::new();
        let mut chars: BTreeSet<char> = BTreeSet::new();
        for report in reports {
            let mut text = NormalizedString::from(report.as_str());
            normalizer
                .normalize(&mut text)
                .map_err(|e| failed("normalising", e))?;
            let mut split = PreTokenizedString::from(text);
            pre.pre_tokenize(&mut split)
                .map_err(|e| failed("splitting", e))?;
            for (word, _, _) in split.get_splits(OffsetReferential::Normalized, OffsetType::Byte) {
                chars.extend(word.chars());
                *words.entry(word.to_string()).or_default() += 1;
            }
        }
        let mut entries: Vec<String> = vec![PAD.into(), UNK.into()];
        for c in &chars {
            entries.push(c.to_string());
            entries.push(format!("##{c}"));
        }
        let mut frequent: Vec<(&String, &u64)> = words
            .iter()
            .filter(|(w, n)| **n >= 2 && w.chars().count() > 1)
            .collect();
        frequent.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        entries.extend(frequent.into_iter().map(|(w, _)| w.clone()));
        entries.truncate(vocab.max(2));
        let ids: ahash::AHashMap<String, u32> = entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| (e, i as u32))
            .collect();
        let wordpiece = WordPiece::builder()
            .vocab(ids)
            .unk_token(UNK.into())
            .build()
            .map_err(|e| failed("wordpiece", e))?;
        let tok = TokenizerBuilder::new()
            .with_model(wordpiece)
            .with_normalizer(Some(normalizer))
            .with_pre_tokenizer(Some(pre))
            .with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>)
            .with_decoder(None::<tokenizers::decoders::DecoderWrapper>)
            .build()
            .map_err(|e| failed("building", e))?;
        Ok(ReportTokenizer(tok.into()))
    }

    /// A tokenizer saved with [`ReportTokenizer::to_json`] (`tokenizer.json`).
    pub fn from_json(text: &str) -> Result<Self> {
        let tok: Tokenizer = text.parse().map_err(|e| failed("tokenizer.json", e))?;
        if tok.token_to_id(PAD) != Some(0) {
            return Err(failed("tokenizer.json", format!("{PAD} is not id 0")));
        }
        Ok(ReportTokenizer(tok))
    }

    /// The tokenizer as the JSON that [`ReportTokenizer::from_json`] and Hugging Face's
    /// `tokenizers` read.
    pub fn to_json(&self) -> Result<String> {
        self.0.to_string(false).map_err(|e| failed("saving", e))
    }

    /// Entries of the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.0.get_vocab_size(true)
    }

    /// Token ids of `texts` (`[n, MAX_TOKENS]`, padded with 0) and the mask of real tokens.
    pub fn encode(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let mut ids = vec![0i64; texts.len() * MAX_TOKENS];
        for (i, t) in texts.iter().enumerate() {
            let enc = self
                .0
                .encode(*t, false)
                .map_err(|e| failed("encoding", e))?;
            for (j, id) in enc.get_ids().iter().take(MAX_TOKENS).enumerate() {
                ids[i * MAX_TOKENS + j] = *id as i64;
            }
        }
        let ids = Tensor::from_slice(&ids).view([texts.len() as i64, MAX_TOKENS as i64]);
        let mask = ids.ne(0);
        Ok((ids, mask))
    }
}

/// Sizes of the text encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextConfig {
    /// Vocabulary entries.
    pub vocab: i64,
    /// Width.
    pub width: i64,
    /// Blocks.
    pub depth: i64,
    /// Attention heads.
    pub heads: i64,
}

/// The report encoder.
#[derive(Debug)]
pub struct TextEncoder {
    embed: nn::Embedding,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
}

impl TextEncoder {
    /// Creates the encoder's variables under `p`.
    pub fn new(p: nn::Path, cfg: TextConfig) -> TextEncoder {
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        };
        let pos_init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        TextEncoder {
            embed: nn::embedding(&p / "token_embed", cfg.vocab, cfg.width, emb),
            pos: p.var("pos_embed", &[1, MAX_TOKENS as i64, cfg.width], pos_init),
            blocks: (0..cfg.depth)
                .map(|i| Block::new(&p / "blocks" / i, cfg.width, cfg.heads, 4))
                .collect(),
            norm: nn::layer_norm(&p / "norm", vec![cfg.width], Default::default()),
        }
    }

    /// One embedding per report: `ids` and `mask` as [`ReportTokenizer::encode`] gives them.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let device = self.pos.device();
        let (ids, mask) = (ids.to_device(device), mask.to_device(device));
        let n = ids.size()[1];
        let mut x = self.embed.forward(&ids) + self.pos.narrow(1, 0, n);
        // Each token attends to the report's tokens; an empty report attends to its first slot.
        let first = Tensor::arange(n, (Kind::Int64, device)).eq(0).unsqueeze(0);
        let keys = mask.logical_or(&first);
        let attend = keys.unsqueeze(1).unsqueeze(1);
        for b in &self.blocks {
            x = b.forward_attending(&x, Some(&attend));
        }
        let x = self.norm.forward(&x);
        let weights = mask.to_kind(Kind::Float).unsqueeze(-1);
        (x * &weights).sum_dim_intlist(1, false, Kind::Float)
            / weights
                .sum_dim_intlist(1, false, Kind::Float)
                .clamp_min(1.0)
    }

    /// The device of the variables.
    pub fn device(&self) -> Device {
        self.pos.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_data::synth::{Site, SynthConfig, cohort};

    fn reports(n: usize) -> Vec<String> {
        let cfg = SynthConfig {
            samples: n,
            size: 16,
            sites: ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(k, s)| Site::standard(s, k))
                .collect(),
            ..Default::default()
        };
        cohort(&cfg).filter_map(|s| s.report).collect()
    }

    #[test]
    fn a_tokenizer_trained_on_reports_round_trips_through_its_json_and_pads_with_zero() {
        let tok = ReportTokenizer::train(reports(200).into_iter(), 400).unwrap();
        assert!(
            tok.vocab_size() > 30 && tok.vocab_size() <= 400,
            "{}",
            tok.vocab_size()
        );
        let again = ReportTokenizer::from_json(&tok.to_json().unwrap()).unwrap();
        let text = [
            "FINDINGS: A 17 mm rounded nodule in the right upper zone.",
            "No lesion.",
        ];
        let (a, mask) = tok.encode(&text).unwrap();
        let (b, _) = again.encode(&text).unwrap();
        assert!(a.equal(&b));
        assert_eq!(a.size(), [2, MAX_TOKENS as i64]);
        let lengths: Vec<i64> = Vec::try_from(mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
        assert!(lengths[0] > lengths[1] && lengths[1] >= 2, "{lengths:?}");
        let unknown = tok.0.token_to_id(UNK).unwrap() as i64;
        assert_eq!(
            a.eq(unknown).sum(Kind::Int64).int64_value(&[]),
            0,
            "every word of the style is known"
        );
        assert!(ReportTokenizer::from_json("{}").is_err());
    }

    #[test]
    fn the_vocabulary_is_a_function_of_the_reports_alone() {
        let a = ReportTokenizer::train(reports(120).into_iter(), 300).unwrap();
        let b = ReportTokenizer::train(reports(120).into_iter(), 300).unwrap();
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
        // A word never seen, of letters seen, splits into known pieces instead of being unknown.
        let (ids, _) = a.encode(&["mulotar"]).unwrap();
        let unknown = a.0.token_to_id(UNK).unwrap() as i64;
        let first: Vec<i64> = Vec::try_from(ids.get(0).narrow(0, 0, 3)).unwrap();
        assert!(first.iter().all(|&i| i != unknown && i != 0), "{first:?}");
    }

    #[test]
    fn padding_does_not_change_a_reports_embedding() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = TextConfig {
            vocab: 50,
            width: 32,
            depth: 2,
            heads: 4,
        };
        let enc = TextEncoder::new(vs.root(), cfg);
        let ids = Tensor::zeros([2, MAX_TOKENS as i64], (Kind::Int64, Device::Cpu));
        let words = Tensor::from_slice(&[5i64, 9, 13]);
        ids.get(0).narrow(0, 0, 3).copy_(&words);
        ids.get(1).narrow(0, 0, 3).copy_(&words);
        // Row 1 has garbage after its three tokens, masked out.
        let _ = ids.get(1).narrow(0, 3, 5).fill_(7);
        let mask = ids.ne(0);
        let _ = mask.get(1).narrow(0, 3, 5).fill_(0);
        let out = tch::no_grad(|| enc.forward(&ids, &mask));
        assert_eq!(out.size(), [2, 32]);
        let diff = (out.get(0) - out.get(1)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }
}
