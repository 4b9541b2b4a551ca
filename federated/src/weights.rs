//! Named tensors as the hub and the sites exchange them: safetensors files of f32, or bf16 to
//! halve the bytes sent, read into f32 for arithmetic. A site's update is its local weights minus
//! the round's global weights, over every tensor training continues from.

use std::collections::BTreeMap;

use half::bf16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::{Result, weights_error};

/// One tensor: its shape and its values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values (as many as the shape's product).
    pub values: Vec<f32>,
}

/// Named tensors (a model's weights, or an update of them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights(pub BTreeMap<String, Tensor>);

/// The element type written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 4 bytes a value, exact.
    F32,
    /// 2 bytes a value (bfloat16, round to nearest even).
    Bf16,
}

/// The SHA-256 of bytes, hex: what statements and lineage name files by.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Weights {
    /// Reads a safetensors file of F32 or BF16 tensors; `what` names it in errors. Memory is
    /// bounded by the file: the header's shapes must match the bytes it holds.
    pub fn from_safetensors(bytes: &[u8], what: &str) -> Result<Weights> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| weights_error(what, e.to_string()))?;
        let mut out = BTreeMap::new();
        for (name, view) in st.tensors() {
            let values = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(weights_error(
                        what,
                        format!("tensor {name} is {other:?}; updates are F32 or BF16"),
                    ));
                }
            };
            let values: Vec<f32> = values;
            if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                return Err(weights_error(
                    what,
                    format!("tensor {name} holds a non-finite value at {bad}"),
                ));
            }
            out.insert(
                name,
                Tensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(Weights(out))
    }

    /// Writes the tensors as safetensors in `precision`.
    pub fn to_safetensors(&self, precision: Precision) -> Result<Vec<u8>> {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .0
            .iter()
            .map(|(name, t)| {
                let bytes = match precision {
                    Precision::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Precision::Bf16 => t
                        .values
                        .iter()
                        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                (name.clone(), bytes, t.shape.clone())
            })
            .collect();
        let dtype = match precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::BF16,
        };
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(name, bytes, shape)| {
                TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| weights_error(name, e.to_string()))
            })
            .collect::<Result<_>>()?;
        safetensors::tensor::serialize(views, None)
            .map_err(|e| weights_error("safetensors", e.to_string()))
    }

    /// Number of values over every tensor.
    pub fn len(&self) -> usize {
        self.0.values().map(|t| t.values.len()).sum()
    }

    /// Whether there is no value at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The L2 norm over every value.
    pub fn norm(&self) -> f64 {
        self.0
            .values()
            .flat_map(|t| &t.values)
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt()
    }

    /// Every value multiplied by `factor`.
    pub fn scaled(&self, factor: f64) -> Weights {
        self.map(|v| (f64::from(v) * factor) as f32)
    }

    fn map(&self, f: impl Fn(f32) -> f32) -> Weights {
        Weights(
            self.0
                .iter()
                .map(|(n, t)| {
                    let values = t.values.iter().map(|v| f(*v)).collect();
                    (
                        n.clone(),
                        Tensor {
                            shape: t.shape.clone(),
                            values,
                        },
                    )
                })
                .collect(),
        )
    }

    /// Checks that `other` has exactly the same tensor names and shapes; `what` names `other`.
    pub fn check_same_layout(&self, other: &Weights, what: &str) -> Result<()> {
        for (name, t) in &self.0 {
            match other.0.get(name) {
                None => return Err(weights_error(what, format!("tensor {name} is missing"))),
                Some(o) if o.shape != t.shape => {
                    return Err(weights_error(
                        what,
                        format!(
                            "tensor {name} has shape {:?}, expected {:?}",
                            o.shape, t.shape
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = other.0.keys().find(|k| !self.0.contains_key(*k)) {
            return Err(weights_error(what, format!("unexpected tensor {extra}")));
        }
        Ok(())
    }

    /// `self − base`, tensor by tensor (a site's update); the layouts must match.
    pub fn minus(&self, base: &Weights, what: &str) -> Result<Weights> {
        base.check_same_layout(self, what)?;
        Ok(self.zip(base, |a, b| a - b))
    }

    /// `self + update`, tensor by tensor (the next global model); the layouts must match.
    pub fn plus(&self, update: &Weights, what: &str) -> Result<Weights> {
        self.check_same_layout(update, what)?;
        Ok(self.zip(update, |a, b| a + b))
    }

    fn zip(&self, other: &Weights, f: impl Fn(f32, f32) -> f32) -> Weights {
        Weights(
            self.0
                .iter()
                .map(|(n, t)| {
                    let o = &other.0[n];
                    let values = t
                        .values
                        .iter()
                        .zip(&o.values)
                        .map(|(a, b)| f(*a, *b))
                        .collect();
                    (
                        n.clone(),
                        Tensor {
                            shape: t.shape.clone(),
                            values,
                        },
                    )
                })
                .collect(),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn weights(values: &[(&str, Vec<f32>)]) -> Weights {
        Weights(
            values
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        Tensor {
                            shape: vec![v.len()],
                            values: v.clone(),
                        },
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn weights_survive_safetensors_exactly_in_f32_and_to_bf16_precision() {
        let w = weights(&[
            ("encoder.w", vec![1.0, -2.5, 0.123_456_78]),
            ("decoder.b", vec![3.0]),
        ]);
        let f32_bytes = w.to_safetensors(Precision::F32).unwrap();
        assert_eq!(Weights::from_safetensors(&f32_bytes, "f32").unwrap(), w);
        let bf16_bytes = w.to_safetensors(Precision::Bf16).unwrap();
        assert!(bf16_bytes.len() < f32_bytes.len());
        let back = Weights::from_safetensors(&bf16_bytes, "bf16").unwrap();
        for (a, b) in w.0["encoder.w"]
            .values
            .iter()
            .zip(&back.0["encoder.w"].values)
        {
            assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_tensor() {
        let err = Weights::from_safetensors(b"not safetensors", "site-a/round-1.safetensors")
            .unwrap_err();
        assert!(
            err.to_string().starts_with("site-a/round-1.safetensors:"),
            "{err}"
        );
        let nan = weights(&[("w", vec![1.0, f32::NAN])])
            .to_safetensors(Precision::F32)
            .unwrap();
        let err = Weights::from_safetensors(&nan, "u").unwrap_err();
        assert!(
            err.to_string()
                .contains("tensor w holds a non-finite value at 1"),
            "{err}"
        );
    }

    #[test]
    fn an_update_is_local_minus_global_and_layouts_must_match() {
        let global = weights(&[("w", vec![1.0, 1.0])]);
        let local = weights(&[("w", vec![1.5, 0.0])]);
        let update = local.minus(&global, "site-a").unwrap();
        assert_eq!(update.0["w"].values, vec![0.5, -1.0]);
        assert!((update.norm() - 1.25f64.sqrt()).abs() < 1e-9);
        assert_eq!(global.plus(&update, "u").unwrap(), local);
        let other = weights(&[("w", vec![1.0, 2.0, 3.0])]);
        assert!(
            other
                .minus(&global, "site-b")
                .unwrap_err()
                .to_string()
                .contains("shape [3]")
        );
        let renamed = weights(&[("v", vec![1.0, 2.0])]);
        assert!(
            renamed
                .minus(&global, "site-c")
                .unwrap_err()
                .to_string()
                .contains("tensor w is missing")
        );
    }
}
