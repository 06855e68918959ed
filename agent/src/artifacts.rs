//! Artifact bytes on disk: one plain file per artifact beside the sled store, which keeps only
//! state (trust, slots, downloads, errors).
//!
//! - `<sha256>.part` while downloading. Its full size is reserved when the download starts (a
//!   full disk fails then, with a clear error, not halfway). Chunks are written at their
//!   offsets as they arrive and never synced one by one: what a partial file holds is decided
//!   by hashing it — a chunk counts as received only if its bytes match the signed digest — so
//!   a crash or power cut at any instant costs at worst some chunks fetched again.
//! - `<sha256>` once complete: the whole file matched the manifest's SHA-256, was synced,
//!   renamed and its directory synced. That SHA-256 is computed as the chunks are written
//!   ([`WholeHash`]), so a download ends without a second pass over its bytes. Readers check every chunk's digest again as they read,
//!   so bytes altered on disk later are caught too.
//!
//! Files rather than sled values: sled copies every value through its page cache and log, which
//! cost 3–5× the artifact in disk and memory; a file costs the artifact once, and a page cache
//! the kernel can drop.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use modelcast_proto::manifest::Layout;
use sha2::{Digest, Sha256};

use crate::store_error::StoreError;

/// Beside a complete artifact `<sha256>`, `<sha256>.manifest` holds the manifest the device
/// accepted it under, so that a store whose database is lost can be rebuilt from the files.
const MANIFEST_SUFFIX: &str = ".manifest";

/// The most bytes a kept manifest file may hold (the disk is input too).
const MAX_MANIFEST_FILE: u64 = 4 * 1024 * 1024;

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a
/// temporary file beside it, synced, renamed over it, and the directory synced.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// The digest a file of the artifact directory belongs to, and whether it is a partial
/// download (`.part`): artifacts, partial files, kept manifests and temporary files alike.
fn digest_of(file: &str) -> (&str, bool) {
    let file = file.strip_suffix(".tmp").unwrap_or(file);
    if let Some(digest) = file.strip_suffix(".part") {
        return (digest, true);
    }
    (file.strip_suffix(MANIFEST_SUFFIX).unwrap_or(file), false)
}

/// The artifact files of one store.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
    /// The whole-artifact hash of each download in progress (partial file name → hash).
    hashing: Arc<Mutex<HashMap<String, WholeHash>>>,
}

/// The SHA-256 of a partial file, computed as its chunks are written: over the chunks written
/// in order from the first, with those written past a gap remembered (indices only) and read
/// back from the file once the gap closes. Lost with the process; a download resumed after a
/// restart seeds it while hashing what the file holds ([`Artifacts::received`]).
#[derive(Debug, Default)]
struct WholeHash {
    hasher: Sha256,
    /// The first chunk not hashed yet.
    next: u32,
    /// Chunks written past `next`.
    ahead: BTreeSet<u32>,
}

impl WholeHash {
    /// Takes chunk `index`, whose bytes are `data`, written to `file` (the chunks past a gap
    /// it closes are read back from there). False if a read failed: the hash is lost.
    fn take(&mut self, file: &File, layout: &Layout<'_>, index: u32, data: &[u8]) -> bool {
        if index < self.next || self.ahead.contains(&index) {
            return true; // Written again: the same bytes (checked against their digest).
        }
        if index > self.next {
            self.ahead.insert(index);
            return true;
        }
        self.hasher.update(data);
        self.next += 1;
        let mut buf = Vec::new();
        while self.ahead.remove(&self.next) {
            let Some(span) = layout.span(self.next) else {
                return false;
            };
            buf.resize(span.len as usize, 0);
            if file.read_exact_at(&mut buf, span.offset).is_err() {
                return false;
            }
            self.hasher.update(&buf);
            self.next += 1;
        }
        true
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A manifest's digest, checked to be 64 hex digits (it names a file).
fn file_name(layout: &Layout<'_>) -> Result<String, StoreError> {
    modelcast_proto::chunk::parse_digest(layout.sha256).map_err(|e| StoreError::Corrupt {
        key: format!("artifact {:?}", layout.sha256),
        reason: e.to_string(),
    })?;
    Ok(layout.sha256.to_ascii_lowercase())
}

fn mismatch(layout: &Layout<'_>, reason: String) -> StoreError {
    StoreError::DigestMismatch {
        artifact: layout.sha256.to_string(),
        reason,
    }
}

impl Artifacts {
    /// Opens (creating) the artifact directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        Ok(Artifacts {
            dir: dir.into(),
            hashing: Arc::default(),
        })
    }

    fn complete_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn part_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.part"))
    }

    /// Starts (or continues) the download of `manifest`: a new partial file gets its space
    /// reserved; an existing one is hashed. Returns which chunks are already on disk.
    pub fn begin(&self, layout: &Layout<'_>) -> Result<Vec<bool>, StoreError> {
        let name = file_name(layout)?;
        let path = self.part_path(&name);
        let complete = self.complete_path(&name);
        if complete.exists() {
            // Asked for again (a fleet rollback to a version still on disk, or healing): the
            // file is used only if its bytes are still the signed ones.
            match self.verify(layout) {
                Ok(()) => return Ok(vec![true; layout.chunks.len()]),
                Err(e) => {
                    tracing::warn!(artifact = %name, error = %e, "stored artifact is damaged; downloading it again");
                    std::fs::remove_file(&complete).map_err(|e| io_err(&complete, e))?;
                    self.forget_manifest(&name)?;
                }
            }
        }
        let file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return self.received(layout),
            Err(e) => return Err(io_err(&path, e)),
        };
        if let Err(e) = crate::sys::reserve(&file, layout.size) {
            drop(file);
            // Whatever part of the reservation was made goes back to the disk.
            let _ = std::fs::remove_file(&path);
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(StoreError::NoSpace {
                    needed: layout.size,
                    available: crate::sys::free_bytes(&self.dir).unwrap_or(0),
                    dir: self.dir.display().to_string(),
                });
            }
            return Err(io_err(&path, e));
        }
        // Just created: nothing to hash yet.
        self.hashes().insert(name, WholeHash::default());
        Ok(vec![false; layout.chunks.len()])
    }

    /// Writes chunk `index` (already checked against its digest) at its offset.
    pub fn put_chunk(
        &self,
        layout: &Layout<'_>,
        index: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let name = file_name(layout)?;
        let Some(span) = layout.span(index).filter(|s| s.len as usize == data.len()) else {
            return Err(mismatch(
                layout,
                format!("chunk {index} of {} bytes does not fit", data.len()),
            ));
        };
        let path = self.part_path(&name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        file.write_all_at(data, span.offset)
            .map_err(|e| io_err(&path, e))?;
        let mut hashes = self.hashes();
        if let Some(whole) = hashes.get_mut(&name) {
            if !whole.take(&file, layout, index, data) {
                hashes.remove(&name);
            }
        }
        Ok(())
    }

    fn hashes(&self) -> std::sync::MutexGuard<'_, HashMap<String, WholeHash>> {
        self.hashing.lock().expect("hashing lock")
    }

    /// Which chunks of `manifest` are on disk with the right bytes (resume after a restart).
    pub fn received(&self, layout: &Layout<'_>) -> Result<Vec<bool>, StoreError> {
        let name = file_name(layout)?;
        let count = layout.chunks.len();
        if self.complete_path(&name).exists() {
            return Ok(vec![true; count]);
        }
        let path = self.part_path(&name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![false; count]),
            Err(e) => return Err(io_err(&path, e)),
        };
        let mut buf = vec![0u8; layout.chunk_size as usize];
        let mut have = vec![false; count];
        // The whole-artifact hash goes on from what the file holds.
        let mut whole = WholeHash::default();
        for ((index, slot), span) in have.iter_mut().enumerate().zip(layout.spans()) {
            let chunk = &mut buf[..span.len as usize];
            match file.read_exact_at(chunk, span.offset) {
                Ok(()) => *slot = modelcast_proto::sha256_hex(chunk) == layout.chunks[index],
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io_err(&path, e)),
            }
            if *slot && whole.next == index as u32 {
                whole.hasher.update(&*chunk);
                whole.next += 1;
            } else if *slot {
                whole.ahead.insert(index as u32);
            }
        }
        self.hashes().insert(name, whole);
        Ok(have)
    }

    /// Checks the whole artifact against the manifest's size and SHA-256. A partial file that
    /// passes is synced and renamed to its final name (and the directory synced) before this
    /// returns: from then on it is complete across crashes.
    pub fn verify(&self, layout: &Layout<'_>) -> Result<(), StoreError> {
        let name = file_name(layout)?;
        let complete = self.complete_path(&name);
        let (path, partial) = if complete.exists() {
            (complete.clone(), false)
        } else {
            (self.part_path(&name), true)
        };
        let mut file = File::open(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => StoreError::MissingArtifact {
                artifact: layout.sha256.to_string(),
            },
            _ => io_err(&path, e),
        })?;
        let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
        if len != layout.size {
            return Err(mismatch(
                layout,
                format!("{len} bytes, manifest says {}", layout.size),
            ));
        }
        // A download hashed as it was written needs no second pass.
        let running = match partial {
            true => self.hashes().remove(&name),
            false => None,
        };
        let digest = match running {
            Some(w) if w.next as usize == layout.chunks.len() => w.hasher.finalize(),
            _ => {
                let mut whole = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = file.read(&mut buf).map_err(|e| io_err(&path, e))?;
                    if n == 0 {
                        break;
                    }
                    whole.update(&buf[..n]);
                }
                whole.finalize()
            }
        };
        if hex::encode(digest) != layout.sha256.to_ascii_lowercase() {
            return Err(mismatch(layout, "whole-artifact SHA-256 differs".into()));
        }
        if partial {
            file.sync_all().map_err(|e| io_err(&path, e))?;
            std::fs::rename(&path, &complete).map_err(|e| io_err(&complete, e))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(&self.dir, e))?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the file `sha256`, complete or partial, if it is on
    /// disk and reaches that far (unchecked: the caller checks them against a digest; a
    /// partial file's chunk not received yet reads as whatever the file holds there).
    pub fn read_held(&self, sha256: &str, offset: u64, len: u32) -> Option<Vec<u8>> {
        modelcast_proto::chunk::parse_digest(sha256).ok()?;
        let name = sha256.to_ascii_lowercase();
        let file = File::open(self.complete_path(&name))
            .or_else(|_| File::open(self.part_path(&name)))
            .ok()?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// A reader over the complete artifact that checks each chunk's digest as it goes.
    pub fn reader(&self, layout: &Layout<'_>) -> Result<ArtifactReader, StoreError> {
        let name = file_name(layout)?;
        let path = self.complete_path(&name);
        let file = File::open(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => StoreError::MissingArtifact {
                artifact: layout.sha256.to_string(),
            },
            _ => io_err(&path, e),
        })?;
        Ok(ArtifactReader {
            file,
            sha256: layout.sha256.to_string(),
            size: layout.size,
            chunk_size: layout.chunk_size,
            segments: layout.segments.to_vec(),
            chunks: layout.chunks.to_vec(),
            next: 0,
            current: Vec::new(),
            offset: 0,
            key: None,
        })
    }

    /// Removes every artifact file whose digest is not in `live`, and partial files of
    /// artifacts that are complete. Returns how many files were removed.
    pub fn collect_garbage(&self, live: &[String]) -> Result<usize, StoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            let (digest, partial) = digest_of(&file);
            let superseded = partial && self.complete_path(digest).exists();
            if superseded || !live.iter().any(|l| l.eq_ignore_ascii_case(digest)) {
                if partial {
                    self.hashes().remove(&digest.to_ascii_lowercase());
                }
                std::fs::remove_file(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Keeps `manifest` (JSON) beside the complete artifact `sha256`, replacing what was kept.
    pub fn keep_manifest(&self, sha256: &str, manifest: &[u8]) -> Result<(), StoreError> {
        let name = sha256.to_ascii_lowercase();
        write_atomically(&self.dir.join(format!("{name}{MANIFEST_SUFFIX}")), manifest)
    }

    /// Whether a manifest is kept beside `sha256`.
    pub fn keeps_manifest(&self, sha256: &str) -> bool {
        let name = sha256.to_ascii_lowercase();
        self.dir.join(format!("{name}{MANIFEST_SUFFIX}")).exists()
    }

    /// Removes the manifest kept beside `sha256`, if any.
    pub fn forget_manifest(&self, sha256: &str) -> Result<(), StoreError> {
        let path = self
            .dir
            .join(format!("{}{MANIFEST_SUFFIX}", sha256.to_ascii_lowercase()));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(&path, e)),
            _ => Ok(()),
        }
    }

    /// The manifests kept beside artifacts, as bytes (a file too large to be one is skipped).
    pub fn kept_manifests(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut kept = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))? {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let path = entry.path();
            if !entry
                .file_name()
                .to_string_lossy()
                .ends_with(MANIFEST_SUFFIX)
            {
                continue;
            }
            match entry.metadata() {
                Ok(m) if m.len() <= MAX_MANIFEST_FILE => {}
                _ => {
                    tracing::warn!(path = %path.display(), "kept manifest skipped: too large or unreadable");
                    continue;
                }
            }
            match std::fs::read(&path) {
                Ok(bytes) => kept.push(bytes),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "kept manifest unreadable")
                }
            }
        }
        Ok(kept)
    }

    /// Bytes the artifact files occupy on disk (allocated blocks, not apparent sizes).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))? {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            if let Ok(m) = entry.metadata() {
                total += m.blocks() * 512;
            }
        }
        Ok(total)
    }
}

/// Streams a complete artifact chunk by chunk, failing on a short or altered chunk.
pub struct ArtifactReader {
    file: File,
    sha256: String,
    size: u64,
    chunk_size: u32,
    segments: Vec<u64>,
    chunks: Vec<String>,
    next: u32,
    current: Vec<u8>,
    offset: usize,
    /// The content key of an encrypted artifact: each chunk is opened after its digest
    /// checks, in memory.
    key: Option<modelcast_proto::seal::ContentKey>,
}

impl ArtifactReader {
    /// Reads the plaintext of an encrypted artifact, each chunk opened with `key`.
    pub fn opening(mut self, key: modelcast_proto::seal::ContentKey) -> Self {
        self.key = Some(key);
        self
    }
}

impl Read for ArtifactReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.offset == self.current.len() {
            let index = self.next;
            let layout = Layout {
                sha256: &self.sha256,
                size: self.size,
                chunk_size: self.chunk_size,
                segments: &self.segments,
                chunks: &self.chunks,
            };
            let Some(len) = layout.chunk_len(index) else {
                return Ok(0);
            };
            self.current.resize(len as usize, 0);
            self.file.read_exact(&mut self.current)?;
            if modelcast_proto::sha256_hex(&self.current) != self.chunks[index as usize] {
                return Err(std::io::Error::other(mismatch(
                    &layout,
                    format!("stored chunk {index} does not match its digest"),
                )));
            }
            if let Some(key) = &self.key {
                key.open_chunk_in_place(index, &mut self.current)
                    .map_err(|e| {
                        std::io::Error::other(StoreError::Sealed {
                            artifact: self.sha256.clone(),
                            reason: e.to_string(),
                        })
                    })?;
            }
            self.offset = 0;
            self.next += 1;
        }
        let n = buf.len().min(self.current.len() - self.offset);
        buf[..n].copy_from_slice(&self.current[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn setup(
        bytes: &[u8],
    ) -> (
        tempfile::TempDir,
        Artifacts,
        modelcast_proto::manifest::Manifest,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let files = Artifacts::open(dir.path()).unwrap();
        let m = modelcast_proto::verify::fixture::manifest("m", 1, bytes, 64);
        (dir, files, m)
    }

    fn hashed(files: &Artifacts, m: &modelcast_proto::manifest::Manifest) -> Option<u32> {
        files
            .hashes()
            .get(&m.sha256.to_ascii_lowercase())
            .map(|w| w.next)
    }

    proptest! {
        /// In whatever order the chunks are written, the hash kept as they are written is
        /// the file's: complete when the last one is, and the download verifies from it.
        #[test]
        fn the_hash_kept_while_writing_is_the_files_in_any_order(
            order in Just((0..16u32).collect::<Vec<u32>>()).prop_shuffle(),
        ) {
            let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
            let (_dir, files, m) = setup(&bytes);
            let layout = m.artifact();
            files.begin(&layout).unwrap();
            for &i in &order {
                let at = i as usize * 64;
                let chunk = &bytes[at..(at + 64).min(bytes.len())];
                files.put_chunk(&layout, i, chunk).unwrap();
                // Written twice: no harm.
                files.put_chunk(&layout, i, chunk).unwrap();
            }
            prop_assert_eq!(hashed(&files, &m), Some(16));
            files.verify(&layout).unwrap();
            prop_assert_eq!(std::fs::read(files.complete_path(&m.sha256)).unwrap(), bytes);
        }
    }

    #[test]
    fn a_chunk_read_back_altered_fails_the_whole_hash() {
        let bytes: Vec<u8> = (0..256u32).map(|i| i as u8).collect();
        let (_dir, files, m) = setup(&bytes);
        let layout = m.artifact();
        files.begin(&layout).unwrap();
        files.put_chunk(&layout, 1, &bytes[64..128]).unwrap();
        // Chunk 1 is altered on disk while it waits for chunk 0.
        let part = files.part_path(&m.sha256);
        let f = OpenOptions::new().write(true).open(&part).unwrap();
        f.write_all_at(&[0u8; 64], 64).unwrap();
        for i in [0u32, 2, 3] {
            let at = i as usize * 64;
            files.put_chunk(&layout, i, &bytes[at..at + 64]).unwrap();
        }
        assert_eq!(hashed(&files, &m), Some(4));
        assert!(matches!(
            files.verify(&layout),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(part.exists(), "a partial file that fails stays partial");
    }

    #[test]
    fn a_resumed_download_goes_on_hashing_from_what_the_file_holds() {
        let bytes: Vec<u8> = (0..256u32).map(|i| (i * 3) as u8).collect();
        let (dir, files, m) = setup(&bytes);
        let layout = m.artifact();
        files.begin(&layout).unwrap();
        for i in [0u32, 2] {
            let at = i as usize * 64;
            files.put_chunk(&layout, i, &bytes[at..at + 64]).unwrap();
        }
        // A restart: the hash in memory is gone; hashing the file seeds it again.
        let files = Artifacts::open(dir.path()).unwrap();
        let have = files.begin(&layout).unwrap();
        assert_eq!(have, vec![true, false, true, false]);
        assert_eq!(hashed(&files, &m), Some(1));
        for i in [3u32, 1] {
            let at = i as usize * 64;
            files.put_chunk(&layout, i, &bytes[at..at + 64]).unwrap();
        }
        assert_eq!(hashed(&files, &m), Some(4));
        files.verify(&layout).unwrap();
    }
}
