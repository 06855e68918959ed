//! Confidential models: an artifact encrypted chunk by chunk with a content key of its own, and
//! that key sealed to each device allowed to run it. No I/O.
//!
//! - **Chunks.** Each plaintext chunk (as the artifact's layout cuts it: chunk size, restarted
//!   at every segment) is sealed with AES-256-GCM (ring's: AES and carry-less multiply
//!   instructions on x86-64 and on ARMv8 with its cryptography extensions, as Jetsons have;
//!   100 MB opened in about 10 ms here, against 40 ms with ChaCha20-Poly1305) under the
//!   content key, the chunk's
//!   index as nonce and associated data, and stored as ciphertext followed by its 16-byte tag.
//!   The ciphertext file has a layout of its own ([`sealed_layout`]: chunks 16 bytes longer,
//!   segments moved by 16 bytes per chunk before them), so each ciphertext chunk is one sealed
//!   plaintext chunk. The manifest describes the ciphertext (its chunk digests, its SHA-256):
//!   a device rejects a forged chunk by its digest before it decrypts anything, resumes and
//!   fans out ciphertext as any artifact, and a chunk moved to another index fails to open.
//! - **Keys.** A fresh content key per version. It reaches a device sealed to the device's
//!   public key with HPKE (RFC 9180, base mode, HKDF-SHA256, ChaCha20-Poly1305), bound to the
//!   artifact and the device ([`KeyWrap`]): DHKEM(X25519, HKDF-SHA256) for a key in a file,
//!   DHKEM(P-256, HKDF-SHA256) for a key in a PKCS#11 token (tokens such as SoftHSM2 and
//!   TPMs do ECDH on P-256, not X25519; [`open_p256_with`] opens with the token's ECDH). The
//!   same construction seals it to the server's escrow key (X25519), which lets the server
//!   wrap it for devices that join later without ever holding the model in clear.

use hpke::aead::ChaCha20Poly1305 as HpkeAead;
use hpke::kdf::HkdfSha256;
use hpke::kem::{DhP256HkdfSha256, X25519HkdfSha256};
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};

/// The holder name content keys are sealed to the server's escrow key under.
pub const ESCROW: &str = "modelcast escrow";

/// Bytes a sealed chunk adds to its plaintext (the GCM tag).
pub const TAG_LEN: usize = 16;

/// The encryption scheme [`Encryption::scheme`] names (its name predates P-256 wraps: the
/// wrap's KEM follows the device's key, [`SealingKey`], and is no part of the manifest).
pub const SCHEME: &str = "aes256gcm-chunks+hpke-x25519-v1";

/// Associated data every sealed chunk carries before its index.
const CHUNK_AAD: &[u8] = b"modelcast chunk v1";

/// What a manifest says of an encrypted artifact (its `size`, `chunk_size`, `segments` and
/// digests are those of the ciphertext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// [`SCHEME`].
    pub scheme: String,
    /// The plaintext's length.
    pub plain_size: u64,
    /// The plaintext's chunk size (the ciphertext's is [`TAG_LEN`] more).
    pub plain_chunk_size: u32,
}

impl Encryption {
    /// What a manifest says of an artifact of `plain_size` bytes cut at `plain_chunk_size`.
    pub fn new(plain_size: u64, plain_chunk_size: u32) -> Self {
        Encryption {
            scheme: SCHEME.into(),
            plain_size,
            plain_chunk_size,
        }
    }

    /// Whether the ciphertext layout (`size`, `chunk_size`, `segments`) is the sealed layout
    /// of this plaintext; what differs if not.
    pub fn check(
        &self,
        size: u64,
        chunk_size: u32,
        segments: &[u64],
    ) -> Result<(), EncryptionError> {
        if self.scheme != SCHEME {
            return Err(EncryptionError::Scheme(self.scheme.clone()));
        }
        let plain = self.plain_segments(size, chunk_size, segments)?;
        let sealed = sealed_layout(self.plain_size, self.plain_chunk_size, &plain);
        if sealed != (size, chunk_size, segments.to_vec()) {
            return Err(EncryptionError::Layout {
                size,
                chunk_size,
                plain_size: self.plain_size,
                plain_chunk_size: self.plain_chunk_size,
            });
        }
        Ok(())
    }

    /// The plaintext's segments, from the ciphertext's layout.
    pub fn plain_segments(
        &self,
        size: u64,
        chunk_size: u32,
        segments: &[u64],
    ) -> Result<Vec<u64>, EncryptionError> {
        if chunk_size != self.plain_chunk_size.saturating_add(TAG_LEN as u32) {
            return Err(EncryptionError::ChunkSize {
                chunk_size,
                plain_chunk_size: self.plain_chunk_size,
            });
        }
        let mut plain = Vec::with_capacity(segments.len());
        let mut next = segments.iter().peekable();
        // Each ciphertext segment starts a chunk; before it lie `index` sealed chunks.
        for (index, span) in crate::layout::spans(size, chunk_size, segments).enumerate() {
            if next.peek().is_some_and(|s| **s == span.offset) {
                plain.push(span.offset - TAG_LEN as u64 * index as u64);
                next.next();
            }
        }
        match next.next() {
            Some(&offset) => Err(EncryptionError::Segment { offset }),
            None => Ok(plain),
        }
    }
}

/// A manifest's `encryption` that does not fit its artifact's layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncryptionError {
    /// A scheme this build does not know.
    #[error("unknown scheme {0:?} (this device knows {SCHEME})")]
    Scheme(String),
    /// The ciphertext's chunks are not the plaintext's and a tag.
    #[error("chunk size {chunk_size} is not the plaintext's {plain_chunk_size} and a tag")]
    ChunkSize {
        /// The ciphertext's.
        chunk_size: u32,
        /// The plaintext's.
        plain_chunk_size: u32,
    },
    /// A segment that does not start a chunk.
    #[error("the segment at {offset} is not at a chunk's start")]
    Segment {
        /// Its offset.
        offset: u64,
    },
    /// The ciphertext's size or segments are not the sealed layout of the plaintext.
    #[error("{size} bytes in chunks of {chunk_size} is not the sealed layout of {plain_size} bytes in chunks of {plain_chunk_size}")]
    Layout {
        /// The ciphertext's size.
        size: u64,
        /// The ciphertext's chunk size.
        chunk_size: u32,
        /// The plaintext's size.
        plain_size: u64,
        /// The plaintext's chunk size.
        plain_chunk_size: u32,
    },
}

/// Sealing or opening failed; the reason says which part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A chunk failed authentication (forged, damaged, moved, or another key).
    #[error("chunk {index} failed authentication (forged, damaged, or another key)")]
    Chunk {
        /// The chunk's index.
        index: u32,
    },
    /// A key wrap did not open with this key (wrapped for another device or artifact, or
    /// damaged).
    #[error("the key wrap does not open with this device's key (another device's or artifact's, or damaged)")]
    Wrap,
    /// The device's key (in a token) could not compute its part.
    #[error("the device's key: {0}")]
    Device(String),
    /// Bytes that are not a key of the expected kind.
    #[error("not a valid {what}")]
    Key {
        /// What was expected.
        what: &'static str,
    },
    /// The layout is not one a sealed artifact can have.
    #[error("layout: {0}")]
    Layout(String),
}

/// A version's content key (zeroed when dropped).
#[derive(Clone)]
pub struct ContentKey([u8; 32]);

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(..)")
    }
}

impl Drop for ContentKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl ContentKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut k);
        ContentKey(k)
    }

    /// The key of `bytes` (32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let k: [u8; 32] = bytes.try_into().map_err(|_| SealError::Key {
            what: "content key",
        })?;
        Ok(ContentKey(k))
    }

    fn cipher(&self) -> ring::aead::LessSafeKey {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &self.0)
            .expect("a 32-byte AES-256 key");
        ring::aead::LessSafeKey::new(key)
    }

    /// Seals plaintext chunk `index`: its ciphertext and tag.
    pub fn seal_chunk(&self, index: u32, plain: &[u8]) -> Vec<u8> {
        let (nonce, aad) = chunk_nonce_aad(index);
        let mut out = plain.to_vec();
        self.cipher()
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(&aad),
                &mut out,
            )
            .expect("AES-256-GCM seals any chunk a layout allows");
        out
    }

    /// Opens sealed chunk `index`.
    pub fn open_chunk(&self, index: u32, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut buf = sealed.to_vec();
        self.open_chunk_in_place(index, &mut buf)?;
        Ok(buf)
    }

    /// Opens sealed chunk `index` where it lies: `buf` becomes the plaintext.
    pub fn open_chunk_in_place(&self, index: u32, buf: &mut Vec<u8>) -> Result<(), SealError> {
        let (nonce, aad) = chunk_nonce_aad(index);
        let len = self
            .cipher()
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(&aad),
                buf,
            )
            .map_err(|_| SealError::Chunk { index })?
            .len();
        buf.truncate(len);
        Ok(())
    }

    /// Seals a whole artifact of the plaintext layout `chunk_size`/`segments` (see
    /// [`crate::layout::spans`]): the ciphertext file.
    pub fn seal_artifact(&self, plain: &[u8], chunk_size: u32, segments: &[u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            plain.len() + plain.len() / chunk_size.max(1) as usize * TAG_LEN + TAG_LEN,
        );
        for (index, span) in
            crate::layout::spans(plain.len() as u64, chunk_size, segments).enumerate()
        {
            let at = span.offset as usize;
            out.extend(self.seal_chunk(index as u32, &plain[at..at + span.len as usize]));
        }
        out
    }
}

fn chunk_nonce_aad(index: u32) -> ([u8; 12], Vec<u8>) {
    let mut nonce = [0u8; 12];
    nonce[8..].copy_from_slice(&index.to_be_bytes());
    let mut aad = CHUNK_AAD.to_vec();
    aad.extend_from_slice(&index.to_be_bytes());
    (nonce, aad)
}

/// The ciphertext layout of a plaintext of `size` bytes cut at `chunk_size` and restarted at
/// `segments`: (size, chunk size, segments) of the sealed file, whose every chunk is one sealed
/// plaintext chunk.
pub fn sealed_layout(size: u64, chunk_size: u32, segments: &[u64]) -> (u64, u32, Vec<u64>) {
    let tag = TAG_LEN as u64;
    let mut moved = Vec::with_capacity(segments.len());
    let mut chunks_before = 0u64;
    let mut next = segments.iter().peekable();
    for (index, span) in crate::layout::spans(size, chunk_size, segments).enumerate() {
        if next.peek().is_some_and(|s| **s == span.offset) {
            moved.push(span.offset + tag * index as u64);
            next.next();
        }
        chunks_before = index as u64 + 1;
    }
    (
        size + tag * chunks_before,
        chunk_size + TAG_LEN as u32,
        moved,
    )
}

/// A public key for sealing content keys (a device's, or the server's escrow key), hex in
/// documents: X25519 (32 bytes) for a key in a file, P-256 (65 bytes, uncompressed) for a key
/// in a PKCS#11 token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealingKey {
    /// DHKEM(X25519, HKDF-SHA256).
    X25519(<X25519HkdfSha256 as Kem>::PublicKey),
    /// DHKEM(P-256, HKDF-SHA256).
    P256(<DhP256HkdfSha256 as Kem>::PublicKey),
}

/// The private half of a [`SealingKey`].
pub struct OpeningKey(<X25519HkdfSha256 as Kem>::PrivateKey);

impl std::fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpeningKey(..)")
    }
}

impl OpeningKey {
    /// A fresh key pair.
    pub fn generate() -> (OpeningKey, SealingKey) {
        let (sk, pk) = X25519HkdfSha256::gen_keypair(&mut rand_core::OsRng);
        (OpeningKey(sk), SealingKey::X25519(pk))
    }

    /// The key of its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(bytes)
            .map(OpeningKey)
            .map_err(|_| SealError::Key {
                what: "X25519 private key",
            })
    }

    /// Its 32 bytes (for the key file).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes().to_vec()
    }

    /// Its public half.
    pub fn sealing_key(&self) -> SealingKey {
        SealingKey::X25519(X25519HkdfSha256::sk_to_pk(&self.0))
    }

    /// Opens `wrap`, made for `holder` and `artifact` (hex SHA-256).
    pub fn open(
        &self,
        wrap: &KeyWrap,
        holder: &str,
        artifact: &str,
    ) -> Result<ContentKey, SealError> {
        let enc = hex::decode(&wrap.enc).map_err(|_| SealError::Wrap)?;
        let sealed = hex::decode(&wrap.sealed).map_err(|_| SealError::Wrap)?;
        let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&enc)
            .map_err(|_| SealError::Wrap)?;
        let plain = hpke::single_shot_open::<HpkeAead, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.0,
            &enc,
            &wrap_info(holder, artifact),
            &sealed,
            &[],
        )
        .map_err(|_| SealError::Wrap)?;
        ContentKey::from_bytes(&plain).map_err(|_| SealError::Wrap)
    }
}

impl SealingKey {
    /// The key of its hex form: 32 bytes are an X25519 key, 65 an uncompressed P-256 point.
    pub fn from_hex(hex_key: &str) -> Result<Self, SealError> {
        let what = "sealing key (X25519: 32 bytes; P-256: 65, uncompressed)";
        let bytes = hex::decode(hex_key.trim()).map_err(|_| SealError::Key { what })?;
        match bytes.len() {
            32 => <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&bytes)
                .map(SealingKey::X25519)
                .map_err(|_| SealError::Key {
                    what: "X25519 public key",
                }),
            // hpke checks the point is on the curve.
            65 => <DhP256HkdfSha256 as Kem>::PublicKey::from_bytes(&bytes)
                .map(SealingKey::P256)
                .map_err(|_| SealError::Key {
                    what: "P-256 public key",
                }),
            _ => Err(SealError::Key { what }),
        }
    }

    /// The P-256 key of `point` (uncompressed: `04 || X || Y`).
    pub fn p256(point: &[u8]) -> Result<Self, SealError> {
        <DhP256HkdfSha256 as Kem>::PublicKey::from_bytes(point)
            .map(SealingKey::P256)
            .map_err(|_| SealError::Key {
                what: "P-256 public key",
            })
    }

    /// Its bytes (X25519: 32; P-256: 65, uncompressed).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            SealingKey::X25519(pk) => pk.to_bytes().to_vec(),
            SealingKey::P256(pk) => pk.to_bytes().to_vec(),
        }
    }

    /// Its hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.to_bytes())
    }

    /// Seals `key` for the holder of this key (`holder`: a device id, or the escrow's name)
    /// and `artifact` (hex SHA-256): a wrap that opens only with both.
    pub fn wrap(&self, key: &ContentKey, holder: &str, artifact: &str) -> KeyWrap {
        self.wrap_with(key, holder, artifact, &mut rand_core::OsRng)
    }

    /// As [`SealingKey::wrap`], the same wrap every time for the same `seed` (a secret of the
    /// sealer's, unique to this key, holder and artifact): a director that wraps a device's
    /// key again signs the same target, so its desired state changes only when the device's
    /// key does.
    pub fn wrap_seeded(
        &self,
        key: &ContentKey,
        holder: &str,
        artifact: &str,
        seed: [u8; 32],
    ) -> KeyWrap {
        self.wrap_with(key, holder, artifact, &mut SeededRng::new(seed))
    }

    fn wrap_with<R: rand_core::CryptoRng + rand_core::RngCore>(
        &self,
        key: &ContentKey,
        holder: &str,
        artifact: &str,
        rng: &mut R,
    ) -> KeyWrap {
        let info = wrap_info(holder, artifact);
        let (enc, sealed) = match self {
            SealingKey::X25519(pk) => seal_to::<X25519HkdfSha256, _>(pk, &info, key, rng),
            SealingKey::P256(pk) => seal_to::<DhP256HkdfSha256, _>(pk, &info, key, rng),
        };
        KeyWrap {
            enc: hex::encode(enc),
            sealed: hex::encode(sealed),
        }
    }
}

/// HPKE in base mode with the KEM `K`: the encapsulated key and the sealed content key.
fn seal_to<K: Kem, R: rand_core::CryptoRng + rand_core::RngCore>(
    pk: &K::PublicKey,
    info: &[u8],
    key: &ContentKey,
    rng: &mut R,
) -> (Vec<u8>, Vec<u8>) {
    let (enc, sealed) = hpke::single_shot_seal::<HpkeAead, HkdfSha256, K, _>(
        &OpModeS::Base,
        pk,
        info,
        &key.0,
        &[],
        rng,
    )
    .expect("sealing 32 bytes to a valid public key");
    (enc.to_bytes().to_vec(), sealed)
}

/// Opens `wrap`, sealed to the P-256 key `public` for `holder` and `artifact`, with `ecdh`: the
/// private half's Diffie-Hellman with the sender's point it is given (uncompressed), returning
/// the shared point's X coordinate, as a PKCS#11 token's `CKM_ECDH1_DERIVE` does. The rest is
/// HPKE's receiver side in base mode (RFC 9180 §4.1 and §5.1: DHKEM(P-256, HKDF-SHA256),
/// HKDF-SHA256, ChaCha20-Poly1305), written here because the hpke crate needs the private key
/// in memory; the tests check it against that crate.
pub fn open_p256_with<E: std::fmt::Display>(
    public: &SealingKey,
    wrap: &KeyWrap,
    holder: &str,
    artifact: &str,
    ecdh: impl FnOnce(&[u8]) -> Result<[u8; 32], E>,
) -> Result<ContentKey, SealError> {
    let SealingKey::P256(own) = public else {
        return Err(SealError::Key {
            what: "P-256 public key",
        });
    };
    let enc = hex::decode(&wrap.enc).map_err(|_| SealError::Wrap)?;
    let sealed = hex::decode(&wrap.sealed).map_err(|_| SealError::Wrap)?;
    // The sender's point must be one: a token is not asked about anything else.
    <DhP256HkdfSha256 as Kem>::PublicKey::from_bytes(&enc).map_err(|_| SealError::Wrap)?;
    let mut dh = ecdh(&enc).map_err(|e| SealError::Device(e.to_string()))?;
    let mut kem_context = enc;
    kem_context.extend_from_slice(&own.to_bytes());
    let plain = hpke_p256::open(&dh, &kem_context, &wrap_info(holder, artifact), &sealed);
    zeroize::Zeroize::zeroize(&mut dh);
    let mut plain = plain.ok_or(SealError::Wrap)?;
    let key = ContentKey::from_bytes(&plain).map_err(|_| SealError::Wrap);
    zeroize::Zeroize::zeroize(&mut plain);
    key
}

/// HPKE's key schedule for [`open_p256_with`], from RFC 9180's pseudocode.
mod hpke_p256 {
    use sha2::Sha256;

    /// `"KEM" || I2OSP(0x0010, 2)`: DHKEM(P-256, HKDF-SHA256).
    const KEM_SUITE: &[u8] = b"KEM\x00\x10";
    /// `"HPKE" || kem_id || kdf_id (HKDF-SHA256) || aead_id (ChaCha20-Poly1305)`.
    const SUITE: &[u8] = b"HPKE\x00\x10\x00\x01\x00\x03";

    fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> [u8; 32] {
        let mut extract = hkdf::HkdfExtract::<Sha256>::new(Some(salt));
        for part in [b"HPKE-v1".as_slice(), suite, label, ikm] {
            extract.input_ikm(part);
        }
        extract.finalize().0.into()
    }

    fn labeled_expand(suite: &[u8], prk: &[u8; 32], label: &[u8], info: &[u8], out: &mut [u8]) {
        let len = u16::try_from(out.len())
            .expect("a short output")
            .to_be_bytes();
        hkdf::Hkdf::<Sha256>::from_prk(prk)
            .expect("a 32-byte PRK")
            .expand_multi_info(&[&len, b"HPKE-v1", suite, label, info], out)
            .expect("at most 255 blocks");
    }

    /// The plaintext of `sealed` (sequence number 0) for the shared secret `dh` of the
    /// encapsulation in `kem_context` (`enc || pkRm`) and `info`; `None` if it does not open.
    pub(super) fn open(
        dh: &[u8; 32],
        kem_context: &[u8],
        info: &[u8],
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        // Decap: ExtractAndExpand(dh, kem_context).
        let eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh);
        let mut shared = [0u8; 32];
        labeled_expand(
            KEM_SUITE,
            &eae_prk,
            b"shared_secret",
            kem_context,
            &mut shared,
        );
        // KeySchedule in mode_base: no PSK.
        let psk_id_hash = labeled_extract(SUITE, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(SUITE, b"", b"info_hash", info);
        let mut context = vec![0u8];
        context.extend_from_slice(&psk_id_hash);
        context.extend_from_slice(&info_hash);
        let mut secret = labeled_extract(SUITE, &shared, b"secret", b"");
        let mut key = [0u8; 32];
        let mut nonce = [0u8; 12];
        labeled_expand(SUITE, &secret, b"key", &context, &mut key);
        labeled_expand(SUITE, &secret, b"base_nonce", &context, &mut nonce);
        let cipher = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key)
                .expect("a 32-byte key"),
        );
        let mut buf = sealed.to_vec();
        let plain = cipher
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut buf,
            )
            .ok()
            .map(|p| p.len());
        for s in [&mut shared, &mut secret, &mut key] {
            zeroize::Zeroize::zeroize(s);
        }
        plain.map(|len| {
            buf.truncate(len);
            buf
        })
    }
}

/// A ChaCha20 keystream as random bytes, from a secret seed (the HPKE encapsulation of
/// [`SealingKey::wrap_seeded`]).
struct SeededRng(chacha20::ChaCha20);

impl SeededRng {
    fn new(seed: [u8; 32]) -> Self {
        use chacha20::cipher::KeyIvInit;
        SeededRng(chacha20::ChaCha20::new((&seed).into(), (&[0u8; 12]).into()))
    }
}

impl rand_core::RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use chacha20::cipher::StreamCipher;
        dest.fill(0);
        self.0.apply_keystream(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for SeededRng {}

fn wrap_info(holder: &str, artifact: &str) -> Vec<u8> {
    format!(
        "modelcast content key v1\0{holder}\0{}",
        artifact.to_ascii_lowercase()
    )
    .into_bytes()
}

/// A content key sealed to one holder's [`SealingKey`] (HPKE: the encapsulated key and the
/// sealed key, hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyWrap {
    /// The HPKE encapsulated key.
    pub enc: String,
    /// The sealed content key.
    pub sealed: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_chunk_opens_only_at_its_index_with_its_key() {
        let key = ContentKey::generate();
        let sealed = key.seal_chunk(3, b"weights");
        assert_eq!(sealed.len(), 7 + TAG_LEN);
        assert_eq!(key.open_chunk(3, &sealed).unwrap(), b"weights");
        assert_eq!(
            key.open_chunk(4, &sealed),
            Err(SealError::Chunk { index: 4 })
        );
        assert!(ContentKey::generate().open_chunk(3, &sealed).is_err());
        let mut forged = sealed.clone();
        forged[0] ^= 1;
        assert!(key.open_chunk(3, &forged).is_err());
    }

    #[test]
    fn a_wrap_opens_only_for_its_device_and_artifact() {
        let (device, public) = OpeningKey::generate();
        let key = ContentKey::generate();
        let sha = "ab".repeat(32);
        let wrap = public.wrap(&key, "edge-1", &sha);
        assert_eq!(device.open(&wrap, "edge-1", &sha).unwrap().0, key.0);
        assert_eq!(
            device.open(&wrap, "edge-2", &sha).unwrap_err(),
            SealError::Wrap
        );
        assert!(device.open(&wrap, "edge-1", &"cd".repeat(32)).is_err());
        let (other, _) = OpeningKey::generate();
        assert!(other.open(&wrap, "edge-1", &sha).is_err());
        // Through its files: the private key's bytes and the public key's hex.
        let again = OpeningKey::from_bytes(&device.to_bytes()).unwrap();
        assert_eq!(again.sealing_key().to_hex(), public.to_hex());
        assert_eq!(SealingKey::from_hex(&public.to_hex()).unwrap(), public);
        assert!(SealingKey::from_hex("00").is_err());
        // Seeded: the same wrap for the same seed, and it opens.
        let seeded = public.wrap_seeded(&key, "edge-1", &sha, [7; 32]);
        assert_eq!(seeded, public.wrap_seeded(&key, "edge-1", &sha, [7; 32]));
        assert_ne!(seeded, public.wrap_seeded(&key, "edge-1", &sha, [8; 32]));
        assert_eq!(device.open(&seeded, "edge-1", &sha).unwrap().0, key.0);
        let mut damaged = wrap.clone();
        damaged.sealed.replace_range(0..2, "00");
        assert!(device.open(&damaged, "edge-1", &sha).is_err());
    }

    #[test]
    fn a_wrap_to_a_p256_key_opens_with_its_ecdh_alone() {
        // A token's key, as software: its scalar computes the ECDH a token would.
        let (sk, pk) = DhP256HkdfSha256::gen_keypair(&mut rand_core::OsRng);
        let scalar = p256::SecretKey::from_slice(&sk.to_bytes()).unwrap();
        let ecdh = |point: &[u8]| -> Result<[u8; 32], String> {
            let point = p256::PublicKey::from_sec1_bytes(point).map_err(|e| e.to_string())?;
            let shared = p256::ecdh::diffie_hellman(scalar.to_nonzero_scalar(), point.as_affine());
            Ok((*shared.raw_secret_bytes()).into())
        };
        let public = SealingKey::from_hex(&hex::encode(pk.to_bytes())).unwrap();
        assert!(matches!(public, SealingKey::P256(_)));
        assert_eq!(public.to_bytes().len(), 65);
        assert_eq!(SealingKey::p256(&public.to_bytes()).unwrap(), public);
        let key = ContentKey::generate();
        let sha = "ab".repeat(32);
        let wrap = public.wrap(&key, "edge-1", &sha);
        // The hpke crate opens what the key schedule here opens: both are RFC 9180.
        let by_crate = hpke::single_shot_open::<HpkeAead, HkdfSha256, DhP256HkdfSha256>(
            &OpModeR::Base,
            &sk,
            &<DhP256HkdfSha256 as Kem>::EncappedKey::from_bytes(&hex::decode(&wrap.enc).unwrap())
                .unwrap(),
            &wrap_info("edge-1", &sha),
            &hex::decode(&wrap.sealed).unwrap(),
            &[],
        )
        .unwrap();
        assert_eq!(by_crate, key.0);
        let opened = open_p256_with(&public, &wrap, "edge-1", &sha, ecdh).unwrap();
        assert_eq!(opened.0, key.0);
        // Bound to the device and the artifact; a damaged wrap, another key, a failing token.
        let wrap_err = |holder: &str, artifact: &str, wrap: &KeyWrap| {
            open_p256_with(&public, wrap, holder, artifact, ecdh).unwrap_err()
        };
        assert_eq!(wrap_err("edge-2", &sha, &wrap), SealError::Wrap);
        assert_eq!(wrap_err("edge-1", &"cd".repeat(32), &wrap), SealError::Wrap);
        let mut damaged = wrap.clone();
        damaged.sealed.replace_range(0..2, "00");
        assert_eq!(wrap_err("edge-1", &sha, &damaged), SealError::Wrap);
        let mut not_a_point = wrap.clone();
        not_a_point.enc.replace_range(2..4, "00");
        assert_eq!(wrap_err("edge-1", &sha, &not_a_point), SealError::Wrap);
        let (_, other) = DhP256HkdfSha256::gen_keypair(&mut rand_core::OsRng);
        let other = SealingKey::P256(other);
        let to_other = other.wrap(&key, "edge-1", &sha);
        assert_eq!(wrap_err("edge-1", &sha, &to_other), SealError::Wrap);
        assert_eq!(
            open_p256_with(&public, &wrap, "edge-1", &sha, |_| Err::<[u8; 32], _>(
                "locked"
            ))
            .unwrap_err(),
            SealError::Device("locked".into())
        );
        // Seeded wraps stay the same for P-256 too.
        assert_eq!(
            public.wrap_seeded(&key, "edge-1", &sha, [7; 32]),
            public.wrap_seeded(&key, "edge-1", &sha, [7; 32])
        );
        // Hex of any other length is no key.
        assert!(SealingKey::from_hex(&"04".repeat(33)).is_err());
        assert!(SealingKey::from_hex(&format!("05{}", "11".repeat(64))).is_err());
    }

    proptest! {
        /// Every ciphertext chunk of the sealed layout is one sealed plaintext chunk, in order.
        #[test]
        fn the_sealed_layout_cuts_the_ciphertext_at_its_chunks(
            size in 0u64..5000,
            chunk in 16u32..700,
            cuts in proptest::collection::btree_set(1u64..5000, 0..6),
        ) {
            let segments: Vec<u64> = cuts.into_iter().filter(|c| *c < size).collect();
            let plain: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let key = ContentKey::generate();
            let sealed = key.seal_artifact(&plain, chunk, &segments);
            let (s_size, s_chunk, s_segments) = sealed_layout(size, chunk, &segments);
            prop_assert_eq!(s_size, sealed.len() as u64);
            let plain_spans: Vec<_> = crate::layout::spans(size, chunk, &segments).collect();
            let sealed_spans: Vec<_> = crate::layout::spans(s_size, s_chunk, &s_segments).collect();
            prop_assert_eq!(plain_spans.len(), sealed_spans.len());
            let mut opened = Vec::new();
            for (i, span) in sealed_spans.iter().enumerate() {
                let at = span.offset as usize;
                opened.extend(key.open_chunk(i as u32, &sealed[at..at + span.len as usize]).unwrap());
            }
            prop_assert_eq!(opened, plain);
            let e = Encryption::new(size, chunk);
            prop_assert_eq!(e.check(s_size, s_chunk, &s_segments), Ok(()));
            let wrong_chunk = matches!(
                e.check(s_size, s_chunk - 1, &s_segments),
                Err(EncryptionError::ChunkSize { .. })
            );
            prop_assert!(wrong_chunk);
            prop_assert!(e.check(s_size + 1, s_chunk, &s_segments).is_err());
            prop_assert!(e.check(s_size, s_chunk - 1, &s_segments).is_err());
        }
    }
}
