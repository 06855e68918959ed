//! Artifact chunks of the embedded store as files, one per chunk:
//! `<store>/chunks/<artifact hex>/<index>`. sled keeps what it writes in memory (a 320 MB
//! upload took the server to 344 MB), so the bytes of models, hundreds of MB each, stay out
//! of it; sled keeps only each artifact's record. Chunks written before this layout are
//! still read from sled (see `SledStore::chunk`).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::DbError;

/// The chunk files under one directory.
#[derive(Debug, Clone)]
pub struct ChunkFiles {
    dir: PathBuf,
}

fn io(what: &str, e: std::io::Error) -> DbError {
    DbError::Files(format!("{what}: {e}"))
}

impl ChunkFiles {
    /// Chunk files under `dir` (created when the first chunk is written).
    pub fn new(dir: &Path) -> Self {
        ChunkFiles { dir: dir.into() }
    }

    fn artifact_dir(&self, artifact: &[u8; 32]) -> PathBuf {
        self.dir.join(hex::encode(artifact))
    }

    /// Writes chunk `index` durably (a temporary file synced, then renamed into place).
    pub async fn put(&self, artifact: &[u8; 32], index: u32, data: &[u8]) -> Result<(), DbError> {
        let dir = self.artifact_dir(artifact);
        let (data, path) = (data.to_vec(), dir.join(index.to_string()));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let part = dir.join(format!("{index}.part"));
            let mut file = std::fs::File::create(&part)?;
            file.write_all(&data)?;
            file.sync_data()?;
            std::fs::rename(&part, &path)
        })
        .await
        .map_err(|e| DbError::Files(e.to_string()))?
        .map_err(|e| io("write", e))
    }

    /// Makes the artifact's file names durable (before its record says it is complete).
    pub async fn sync(&self, artifact: &[u8; 32]) -> Result<(), DbError> {
        let dir = self.artifact_dir(artifact);
        tokio::task::spawn_blocking(move || match std::fs::File::open(&dir) {
            Ok(d) => d.sync_all(),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| DbError::Files(e.to_string()))?
        .map_err(|e| io("sync", e))
    }

    /// Chunk `index`, if it was written.
    pub async fn get(&self, artifact: &[u8; 32], index: u32) -> Result<Option<Bytes>, DbError> {
        match tokio::fs::read(self.artifact_dir(artifact).join(index.to_string())).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", e)),
        }
    }

    /// Removes every chunk of `artifact`.
    pub async fn remove(&self, artifact: &[u8; 32]) -> Result<(), DbError> {
        match tokio::fs::remove_dir_all(self.artifact_dir(artifact)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_are_written_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::new(&dir.path().join("chunks"));
        let a = [1u8; 32];
        assert_eq!(files.get(&a, 0).await.unwrap(), None);
        files.put(&a, 0, b"zero").await.unwrap();
        files.put(&a, 1, b"one").await.unwrap();
        files.sync(&a).await.unwrap();
        assert_eq!(files.get(&a, 1).await.unwrap().unwrap(), &b"one"[..]);
        files.remove(&a).await.unwrap();
        assert_eq!(files.get(&a, 0).await.unwrap(), None);
        files.remove(&a).await.unwrap();
    }
}
