//! Record keys that cost an idle connection 64 bytes instead of 560.
//!
//! rustls's ring provider keeps one expanded `ring::aead::LessSafeKey` per
//! direction for a connection's whole life. ring sizes that key for its
//! largest algorithm, AES-GCM (the AES key schedule and the GHASH table),
//! so each one is a 560-byte heap block even with ChaCha20-Poly1305, whose
//! key is 32 bytes: 1,120 bytes of an idle wss connection, which is never
//! encrypting anything.
//!
//! The suites here are ring's own (same key exchange, hashes, HKDF and
//! AEAD algorithms), with one change: the encrypter and decrypter keep the
//! raw traffic key and IV, and expand the ring key on the stack for each
//! record. That costs an AES key expansion and a GHASH table per record
//! (about 0.2 µs; ChaCha20-Poly1305's key needs next to no setup);
//! `comet-bench tls-records` measures it, and bench/RESULTS.md has the
//! figures. `--tls-record-keys expanded` serves ring's suites unchanged. A record carries everything written
//! to the socket at once (up to 16 KiB), so under load the expansion is
//! paid per write, not per message.
//!
//! rustls still frames, sequences and orders the records; this module only
//! seals and opens one record's payload, with the nonce and additional data
//! rustls's helpers build, as rustls's ring provider does.

use std::sync::OnceLock;

use zeroize::Zeroize;

use ring::aead;
use rustls::crypto::CryptoProvider;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, KeyBlockShape, MessageDecrypter, MessageEncrypter,
    NONCE_LEN, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls12AeadAlgorithm,
    Tls13AeadAlgorithm, UnsupportedOperationError, make_tls12_aad, make_tls13_aad,
};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, SupportedCipherSuite};

/// TLS's largest record payload; a peer's record that opens to more is an
/// error (rustls checks the same for its own keys).
const MAX_FRAGMENT_LEN: usize = 16 * 1024;
/// The authentication tag of every AEAD here.
const TAG_LEN: usize = 16;
/// TLS 1.2 AES-GCM sends 8 bytes of its nonce in each record.
const GCM_EXPLICIT_NONCE_LEN: usize = 8;

/// A traffic key and IV, kept raw; the ring key is made per record.
struct RawKey {
    alg: &'static aead::Algorithm,
    /// The key's first `alg.key_len()` bytes; the rest are zero.
    key: [u8; 32],
    iv: [u8; NONCE_LEN],
}

impl RawKey {
    fn new(alg: &'static aead::Algorithm, key: &AeadKey, iv: [u8; NONCE_LEN]) -> RawKey {
        let mut raw = [0u8; 32];
        let k = key.as_ref();
        raw[..k.len()].copy_from_slice(k);
        RawKey { alg, key: raw, iv }
    }

    /// The ring key, expanded on the caller's stack.
    fn expand(&self) -> Result<aead::LessSafeKey, Error> {
        aead::UnboundKey::new(self.alg, &self.key[..self.alg.key_len()])
            .map(aead::LessSafeKey::new)
            .map_err(|_| Error::General("bad AEAD key length".into()))
    }

    fn nonce(&self, seq: u64) -> aead::Nonce {
        aead::Nonce::assume_unique_for_key(Nonce::new(&Iv::new(self.iv), seq).0)
    }
}

impl Drop for RawKey {
    fn drop(&mut self) {
        // Key material does not outlive the connection in freed memory (as
        // rustls's own `AeadKey`).
        self.key.zeroize();
        self.iv.zeroize();
    }
}

/// TLS 1.3 records: the content type is sealed inside, the record header
/// is the additional data.
struct Tls13Aead {
    alg: &'static aead::Algorithm,
    /// What the keys are called when rustls extracts them (kTLS; unused by
    /// comet, kept correct).
    secrets: fn(AeadKey, Iv) -> ConnectionTrafficSecrets,
}

impl Tls13AeadAlgorithm for Tls13Aead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Tls13Key(RawKey::new(self.alg, &key, iv_bytes(&iv))))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Tls13Key(RawKey::new(self.alg, &key, iv_bytes(&iv))))
    }

    fn key_len(&self) -> usize {
        self.alg.key_len()
    }

    fn extract_keys(&self, key: AeadKey, iv: Iv) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok((self.secrets)(key, iv))
    }

    fn fips(&self) -> bool {
        false
    }
}

fn iv_bytes(iv: &Iv) -> [u8; NONCE_LEN] {
    let mut b = [0u8; NONCE_LEN];
    b.copy_from_slice(iv.as_ref());
    b
}

struct Tls13Key(RawKey);

impl MessageEncrypter for Tls13Key {
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&[u8::from(msg.typ)]);
        let aad = aead::Aad::from(make_tls13_aad(total_len));
        self.0
            .expand()?
            .seal_in_place_append_tag(self.0.nonce(seq), aad, &mut payload)
            .map_err(|_| Error::EncryptError)?;
        Ok(OutboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl MessageDecrypter for Tls13Key {
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < TAG_LEN {
            return Err(Error::DecryptError);
        }
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain_len =
            self.0.expand()?.open_in_place(self.0.nonce(seq), aad, payload).map_err(|_| Error::DecryptError)?.len();
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

/// TLS 1.2 AES-GCM: a 4-byte salt from the key block, 8 explicit nonce
/// bytes in each record.
struct Tls12Gcm(&'static aead::Algorithm);

impl Tls12AeadAlgorithm for Tls12Gcm {
    fn encrypter(&self, key: AeadKey, iv: &[u8], explicit: &[u8]) -> Box<dyn MessageEncrypter> {
        Box::new(Tls12GcmKey(RawKey::new(self.0, &key, gcm_iv(iv, explicit))))
    }

    fn decrypter(&self, key: AeadKey, iv: &[u8]) -> Box<dyn MessageDecrypter> {
        Box::new(Tls12GcmKey(RawKey::new(self.0, &key, gcm_iv(iv, &[0; 8]))))
    }

    fn key_block_shape(&self) -> KeyBlockShape {
        KeyBlockShape { enc_key_len: self.0.key_len(), fixed_iv_len: 4, explicit_nonce_len: GCM_EXPLICIT_NONCE_LEN }
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: &[u8],
        explicit: &[u8],
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        let iv = Iv::new(gcm_iv(iv, explicit));
        Ok(if self.0.key_len() == 16 {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        })
    }

    fn fips(&self) -> bool {
        false
    }
}

fn gcm_iv(salt: &[u8], explicit: &[u8]) -> [u8; NONCE_LEN] {
    let mut iv = [0u8; NONCE_LEN];
    iv[..4].copy_from_slice(&salt[..4]);
    iv[4..].copy_from_slice(&explicit[..8]);
    iv
}

struct Tls12GcmKey(RawKey);

impl MessageEncrypter for Tls12GcmKey {
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        let nonce = self.0.nonce(seq);
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, msg.payload.len()));
        payload.extend_from_slice(&nonce.as_ref()[4..]);
        payload.extend_from_chunks(&msg.payload);
        let tag = self
            .0
            .expand()?
            .seal_in_place_separate_tag(nonce, aad, &mut payload.as_mut()[GCM_EXPLICIT_NONCE_LEN..])
            .map_err(|_| Error::EncryptError)?;
        payload.extend_from_slice(tag.as_ref());
        Ok(OutboundOpaqueMessage::new(msg.typ, msg.version, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + GCM_EXPLICIT_NONCE_LEN + TAG_LEN
    }
}

impl MessageDecrypter for Tls12GcmKey {
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        if msg.payload.len() < GCM_EXPLICIT_NONCE_LEN + TAG_LEN {
            return Err(Error::DecryptError);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.0.iv[..4]);
        nonce[4..].copy_from_slice(&msg.payload[..GCM_EXPLICIT_NONCE_LEN]);
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        let plain = msg.payload.len() - GCM_EXPLICIT_NONCE_LEN - TAG_LEN;
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, plain));
        let payload = &mut msg.payload;
        let plain_len = self
            .0
            .expand()?
            .open_within(nonce, aad, payload, GCM_EXPLICIT_NONCE_LEN..)
            .map_err(|_| Error::DecryptError)?
            .len();
        if plain_len > MAX_FRAGMENT_LEN {
            return Err(Error::PeerSentOversizedRecord);
        }
        payload.truncate(plain_len);
        Ok(msg.into_plain_message())
    }
}

/// TLS 1.2 ChaCha20-Poly1305 (RFC 7905): a 12-byte IV XORed with the
/// sequence number, nothing explicit in the record.
struct Tls12Chacha;

impl Tls12AeadAlgorithm for Tls12Chacha {
    fn encrypter(&self, key: AeadKey, iv: &[u8], _explicit: &[u8]) -> Box<dyn MessageEncrypter> {
        Box::new(Tls12ChachaKey(RawKey::new(&aead::CHACHA20_POLY1305, &key, iv_bytes(&Iv::copy(iv)))))
    }

    fn decrypter(&self, key: AeadKey, iv: &[u8]) -> Box<dyn MessageDecrypter> {
        Box::new(Tls12ChachaKey(RawKey::new(&aead::CHACHA20_POLY1305, &key, iv_bytes(&Iv::copy(iv)))))
    }

    fn key_block_shape(&self) -> KeyBlockShape {
        KeyBlockShape { enc_key_len: 32, fixed_iv_len: NONCE_LEN, explicit_nonce_len: 0 }
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: &[u8],
        _explicit: &[u8],
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv: Iv::copy(iv) })
    }

    fn fips(&self) -> bool {
        false
    }
}

struct Tls12ChachaKey(RawKey);

impl MessageEncrypter for Tls12ChachaKey {
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, msg.payload.len()));
        payload.extend_from_chunks(&msg.payload);
        self.0
            .expand()?
            .seal_in_place_append_tag(self.0.nonce(seq), aad, &mut payload)
            .map_err(|_| Error::EncryptError)?;
        Ok(OutboundOpaqueMessage::new(msg.typ, msg.version, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + TAG_LEN
    }
}

impl MessageDecrypter for Tls12ChachaKey {
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        if msg.payload.len() < TAG_LEN {
            return Err(Error::DecryptError);
        }
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, msg.payload.len() - TAG_LEN));
        let payload = &mut msg.payload;
        let plain_len =
            self.0.expand()?.open_in_place(self.0.nonce(seq), aad, payload).map_err(|_| Error::DecryptError)?.len();
        if plain_len > MAX_FRAGMENT_LEN {
            return Err(Error::PeerSentOversizedRecord);
        }
        payload.truncate(plain_len);
        Ok(msg.into_plain_message())
    }
}

static TLS13_AES_256_GCM: Tls13Aead =
    Tls13Aead { alg: &aead::AES_256_GCM, secrets: |key, iv| ConnectionTrafficSecrets::Aes256Gcm { key, iv } };
static TLS13_AES_128_GCM: Tls13Aead =
    Tls13Aead { alg: &aead::AES_128_GCM, secrets: |key, iv| ConnectionTrafficSecrets::Aes128Gcm { key, iv } };
static TLS13_CHACHA20: Tls13Aead = Tls13Aead {
    alg: &aead::CHACHA20_POLY1305,
    secrets: |key, iv| ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
};
static TLS12_AES_256_GCM: Tls12Gcm = Tls12Gcm(&aead::AES_256_GCM);
static TLS12_AES_128_GCM: Tls12Gcm = Tls12Gcm(&aead::AES_128_GCM);
static TLS12_CHACHA20: Tls12Chacha = Tls12Chacha;

/// ring's suite with the compact record keys, or None for a suite this
/// module does not know (it is then left out, never served with the
/// expanded keys by accident).
fn compact(suite: SupportedCipherSuite) -> Option<SupportedCipherSuite> {
    use CipherSuite as C;
    Some(match suite {
        SupportedCipherSuite::Tls13(s) => {
            let aead_alg: &'static dyn Tls13AeadAlgorithm = match s.common.suite {
                C::TLS13_AES_256_GCM_SHA384 => &TLS13_AES_256_GCM,
                C::TLS13_AES_128_GCM_SHA256 => &TLS13_AES_128_GCM,
                C::TLS13_CHACHA20_POLY1305_SHA256 => &TLS13_CHACHA20,
                _ => return None,
            };
            SupportedCipherSuite::Tls13(Box::leak(Box::new(rustls::Tls13CipherSuite {
                common: rustls::CipherSuiteCommon { ..s.common },
                hkdf_provider: s.hkdf_provider,
                aead_alg,
                quic: s.quic,
            })))
        }
        SupportedCipherSuite::Tls12(s) => {
            let aead_alg: &'static dyn Tls12AeadAlgorithm = match s.common.suite {
                C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
                    &TLS12_AES_256_GCM
                }
                C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
                    &TLS12_AES_128_GCM
                }
                C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
                    &TLS12_CHACHA20
                }
                _ => return None,
            };
            SupportedCipherSuite::Tls12(Box::leak(Box::new(rustls::Tls12CipherSuite {
                common: rustls::CipherSuiteCommon { ..s.common },
                prf_provider: s.prf_provider,
                kx: s.kx,
                sign: s.sign,
                aead_alg,
            })))
        }
    })
}

/// ring's provider with every cipher suite's record keys kept compact,
/// in ring's order. The suites are made once per process (they must be
/// `'static`), so reloading the certificate does not leak.
pub fn provider() -> CryptoProvider {
    static SUITES: OnceLock<Vec<SupportedCipherSuite>> = OnceLock::new();
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = SUITES.get_or_init(|| p.cipher_suites.iter().filter_map(|&s| compact(s)).collect()).clone();
    p
}
