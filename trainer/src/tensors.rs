//! Named tensors to and from safetensors bytes, so weights and optimizer moments can go to any
//! object store (tch only writes safetensors to local files).

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

fn dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        _ => return None,
    })
}

fn kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        _ => return None,
    })
}

/// Serialises named tensors (copied to the CPU) with optional string metadata.
pub fn to_bytes(
    named: &[(String, Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
    what: &str,
) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::Checkpoint {
        uri: what.into(),
        reason,
    };
    let mut raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dt =
            dtype(t.kind()).ok_or_else(|| bad(format!("{name}: unsupported {:?}", t.kind())))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())
            .map_err(|e| bad(format!("{name}: {e}")))?;
        raw.push((name.clone(), dt, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(format!("{n}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| bad(e.to_string()))
}

/// Parses safetensors bytes into named CPU tensors, sorted by name.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| Error::Checkpoint {
        uri: what.into(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut out: Vec<(String, Tensor)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let k = kind(v.dtype())
                .ok_or_else(|| bad(format!("{name}: unsupported {:?}", v.dtype())))?;
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(v.data(), &shape, k)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The string metadata of safetensors bytes.
pub fn metadata(bytes: &[u8], what: &str) -> Result<std::collections::HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Checkpoint {
        uri: what.into(),
        reason: e.to_string(),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Copies `source` tensors into the same-named variables of `vars` whose names start with
/// `prefix` ("" for all); every such variable must be in `source` with the same shape. Returns
/// the number of variables copied.
pub fn load_into(
    vars: &tch::nn::VarStore,
    source: &[(String, Tensor)],
    prefix: &str,
    what: &str,
) -> Result<usize> {
    let bad = |reason: String| Error::Checkpoint {
        uri: what.into(),
        reason,
    };
    let mut copied = 0;
    let mut targets: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    targets.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, target) in targets.iter().filter(|(n, _)| n.starts_with(prefix)) {
        let (_, t) = source
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| bad(format!("{name} is missing")))?;
        if t.size() != target.size() {
            return Err(bad(format!(
                "{name}: shape {:?} does not match the model's {:?}",
                t.size(),
                target.size()
            )));
        }
        let mut target = target.shallow_clone();
        tch::no_grad(|| target.copy_(&t.to_device(target.device())));
        copied += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_names_shapes_kinds_and_bits() {
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let named = vec![
            ("a.weight".to_string(), a.shallow_clone()),
            ("b".to_string(), b.shallow_clone()),
        ];
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = to_bytes(&named, Some(meta), "test").unwrap();
        let back = from_bytes(&bytes, "test").unwrap();
        assert_eq!(back[0].0, "a.weight");
        assert!(back[0].1.equal(&a));
        assert!(back[1].1.equal(&b));
        assert_eq!(metadata(&bytes, "test").unwrap()["format"], "pt");
    }

    #[test]
    fn truncated_bytes_name_the_object() {
        let named = vec![(
            "w".to_string(),
            Tensor::ones([8], (Kind::Float, Device::Cpu)),
        )];
        let bytes = to_bytes(&named, None, "x").unwrap();
        let e = from_bytes(&bytes[..bytes.len() - 4], "s3://b/ckpt/model.safetensors").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("checkpoint s3://b/ckpt/model.safetensors:"),
            "{e}"
        );
    }
}
