//! The adapter file: one safetensors file whose header metadata holds a JSON description.
//!
//! Written atomically ([`write_atomic`]: a temporary file in the same folder, fsynced, renamed over
//! the target, the folder fsynced) so that a crash or a full disk never leaves a half-written
//! adapter under the final name.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        other => bail!("cannot store a tensor of dtype {other:?}"),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        other => bail!("tensor dtype {other:?} is not supported in an adapter file"),
    })
}

/// Serialises `tensors` (copied to the CPU) with `metadata` and writes them atomically to `path`.
pub fn save_file(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).with_context(|| format!("tensor {name:?}"))?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView)> =
        owned.iter().map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?))).collect::<Result<_>>()?;
    let buffer = safetensors::tensor::serialize(views, &Some(metadata.clone()))?;
    write_atomic(path, &buffer)
}

/// The folder of a file to write does not exist. A type of its own so that the binding
/// `write_atomic` can raise FileNotFoundError for it, while `save_file` keeps raising ValueError.
#[derive(Debug)]
pub struct MissingFolder {
    pub path: PathBuf,
    pub folder: PathBuf,
}

impl std::fmt::Display for MissingFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write {}: folder {} does not exist", self.path.display(), self.folder.display())
    }
}

impl std::error::Error for MissingFolder {}

/// Writes `bytes` to `path` through a temporary file in the same folder (written, fsynced), a
/// rename over `path`, and an fsync of the folder, so that a crash leaves either the old file or
/// the new one. Fails with [`MissingFolder`] when the folder does not exist, and with the
/// `std::io::Error` as root cause (in a context naming `path`) when the write or the rename fails;
/// the temporary file is removed then.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(MissingFolder { path: path.to_path_buf(), folder: dir }.into());
    }
    let name = path.file_name().ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e).context(format!("cannot write {}", path.display())));
    }
    Ok(())
}

/// An adapter file's content: its named tensors in file order and its string metadata.
pub type FileContents = (Vec<(String, Tensor)>, HashMap<String, String>);

/// Reads an adapter file: its tensors (on the CPU, in file order) and its metadata.
pub fn load_file(path: &Path) -> Result<FileContents> {
    let buffer = std::fs::read(path).with_context(|| format!("cannot read adapter file {}", path.display()))?;
    let parsed = SafeTensors::deserialize(&buffer)
        .map_err(|e| anyhow!("{} is not a valid safetensors file (truncated or another format): {e:?}", path.display()))?;
    let (_, header) =
        SafeTensors::read_metadata(&buffer).map_err(|e| anyhow!("{}: unreadable safetensors header: {e:?}", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut named: Vec<(String, TensorView)> = parsed.tensors();
    // Keep the order in which the tensors lie in the file, not the hash order.
    named.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(named.len());
    for (name, view) in named {
        let kind = kind_of(view.dtype()).with_context(|| format!("{}: tensor {name:?}", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let b = Tensor::from_slice(&[0.5f32, -1.5]);
        let meta = HashMap::from([("tlora".to_string(), "{\"format_version\": 1}".to_string())]);
        save_file(&path, &[("x.q".into(), a.shallow_clone()), ("x.lam".into(), b.shallow_clone())], &meta).unwrap();
        let (tensors, m) = load_file(&path).unwrap();
        assert_eq!(m, meta);
        let get = |n: &str| tensors.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        assert!(get("x.q").equal(&a));
        assert!(get("x.lam").equal(&b));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let t = Tensor::ones([16, 16], (Kind::Float, Device::Cpu));
        save_file(&path, &[("w".into(), t)], &HashMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(load_file(&path).unwrap_err().to_string().contains("not a valid safetensors"));
        std::fs::write(&path, b"PK\x03\x04 this is a zip, like a torch pickle").unwrap();
        assert!(load_file(&path).unwrap_err().to_string().contains("not a valid safetensors"));
        assert!(load_file(&dir.path().join("missing.safetensors")).unwrap_err().to_string().contains("cannot read"));
    }

    #[test]
    fn missing_folder_is_an_error_and_target_survives_failure() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("nope").join("a.safetensors");
        assert!(save_file(&bad, &[], &HashMap::new()).unwrap_err().to_string().contains("does not exist"));
        let path = dir.path().join("a.safetensors");
        write_atomic(&path, b"first").unwrap();
        // Renaming onto a directory fails; the old content must remain readable.
        let as_dir = dir.path().join("d");
        std::fs::create_dir(&as_dir).unwrap();
        assert!(write_atomic(&as_dir, b"second").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// What the binding `write_atomic` maps to FileNotFoundError / OSError: a typed missing folder,
    /// an I/O root cause otherwise, both naming the target.
    #[test]
    fn write_atomic_errors_are_typed_and_name_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("nope").join("a.json");
        let err = write_atomic(&bad, b"{}").unwrap_err();
        let missing = err.downcast_ref::<MissingFolder>().expect("a MissingFolder");
        assert_eq!(missing.folder, dir.path().join("nope"));
        assert_eq!(err.to_string(), format!("cannot write {}: folder {} does not exist", bad.display(), missing.folder.display()));
        let as_dir = dir.path().join("d");
        std::fs::create_dir(&as_dir).unwrap();
        let err = write_atomic(&as_dir, b"x").unwrap_err();
        assert!(err.downcast_ref::<MissingFolder>().is_none());
        assert!(err.root_cause().downcast_ref::<std::io::Error>().is_some(), "{err:#}");
        assert!(format!("{err:#}").starts_with(&format!("cannot write {}: ", as_dir.display())), "{err:#}");
        // A file in the current folder (no parent component) is written there.
        let name = format!("tlora-write-atomic-test-{}.tmp", std::process::id());
        write_atomic(Path::new(&name), b"here").unwrap();
        assert_eq!(std::fs::read(&name).unwrap(), b"here");
        std::fs::remove_file(&name).unwrap();
    }
}
