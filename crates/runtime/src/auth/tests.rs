use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

use super::*;

const SECRET: &[u8] = b"a development secret of enough length";

fn verifier(issuer: Option<&str>, audience: Option<&str>) -> Verifier {
    Verifier::new(VerifierConfig {
        issuer: issuer.map(str::to_owned),
        audience: audience.map(str::to_owned),
        hs256_secret: Some(SECRET.to_vec()),
        jwks_file: None,
        leeway: Duration::from_secs(5),
        certificates_only: false,
        jwks_url: false,
    })
    .unwrap()
}

fn claims() -> TokenClaims {
    let mut c = TokenClaims::new("svc-a", &[Role::Service], Duration::from_secs(600));
    c.iss = Some("https://id.example".into());
    c.aud = Some("agentmesh".into());
    c.tenant = Some("team-a".into());
    c
}

#[test]
fn test_a_valid_hs256_token_names_its_subject_tenant_and_roles() {
    let v = verifier(Some("https://id.example"), Some("agentmesh"));
    let token = issue_hs256(SECRET, &claims()).unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!(id.subject, "svc-a");
    assert_eq!(id.tenant.as_deref(), Some("team-a"));
    assert!(id.roles.contains(&Role::Service));
    // Cached: the same Arc comes back.
    assert!(Arc::ptr_eq(&id, &v.verify(&token).unwrap()));
}

use std::sync::Arc;

#[test]
fn test_expired_early_wrong_issuer_wrong_audience_and_tampered_tokens_are_refused() {
    let v = verifier(Some("https://id.example"), Some("agentmesh"));
    let mut expired = claims();
    expired.exp = expired.iat - 60;
    assert_eq!(
        v.verify(&issue_hs256(SECRET, &expired).unwrap()),
        Err(TokenError::Expired)
    );
    let mut early = claims();
    early.nbf = Some(early.iat + 600);
    assert_eq!(
        v.verify(&issue_hs256(SECRET, &early).unwrap()),
        Err(TokenError::NotYetValid)
    );
    let mut other_issuer = claims();
    other_issuer.iss = Some("https://evil.example".into());
    assert!(matches!(
        v.verify(&issue_hs256(SECRET, &other_issuer).unwrap()),
        Err(TokenError::WrongIssuer(_))
    ));
    let mut other_audience = claims();
    other_audience.aud = Some("someone-else".into());
    assert!(matches!(
        v.verify(&issue_hs256(SECRET, &other_audience).unwrap()),
        Err(TokenError::WrongAudience(_))
    ));
    let token = issue_hs256(SECRET, &claims()).unwrap();
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut payload: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(head.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    payload["roles"] = serde_json::json!(["admin"]);
    let forged = format!(
        "{}.{}.{sig}",
        head.split('.').next().unwrap(),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    assert!(
        matches!(v.verify(&forged), Err(TokenError::Invalid(_))),
        "a changed payload fails the signature"
    );
    assert!(matches!(v.verify("not a jwt"), Err(TokenError::Invalid(_))));
    let other_secret = issue_hs256(b"another secret entirely, also long", &claims()).unwrap();
    assert!(matches!(
        v.verify(&other_secret),
        Err(TokenError::Invalid(_))
    ));
}

/// An EC P-256 key: (PKCS#8 for signing, its public JWK with `kid`).
fn ec_key(kid: &str) -> (Vec<u8>, serde_json::Value) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref();
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
    });
    (pkcs8.as_ref().to_vec(), jwk)
}

fn sign_es256(pkcs8: &[u8], kid: &str, claims: &TokenClaims) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8),
    )
    .unwrap()
}

#[test]
fn test_es256_keys_come_from_the_jwks_file_and_rotate_without_a_restart() {
    let dir = tempfile_dir();
    let path = dir.join("jwks.json");
    let (old_key, old_jwk) = ec_key("k1");
    std::fs::write(&path, serde_json::json!({"keys": [old_jwk]}).to_string()).unwrap();
    let v = Verifier::new(VerifierConfig {
        jwks_file: Some(path.clone()),
        ..VerifierConfig::default()
    })
    .unwrap();
    let token = sign_es256(&old_key, "k1", &claims());
    assert_eq!(v.verify(&token).unwrap().subject, "svc-a");
    assert!(
        matches!(
            v.verify(&issue_hs256(SECRET, &claims()).unwrap()),
            Err(TokenError::Invalid(_))
        ),
        "no HS256 secret configured"
    );

    // Rotation: k2 replaces k1 in the file.
    let (new_key, new_jwk) = ec_key("k2");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&path, serde_json::json!({"keys": [new_jwk]}).to_string()).unwrap();
    let modified = std::time::SystemTime::now() + Duration::from_secs(1);
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(modified).unwrap();
    assert!(v.refresh().unwrap(), "the changed file is read again");
    assert!(
        matches!(v.verify(&token), Err(TokenError::Invalid(_))),
        "the removed key stops working at once"
    );
    let fresh = sign_es256(&new_key, "k2", &claims());
    assert_eq!(v.verify(&fresh).unwrap().subject, "svc-a");
    assert!(!v.refresh().unwrap(), "an unchanged file is not read again");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "agentmesh-auth-{}-{:x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(1);
    h.finish()
}

#[test]
fn test_roles_parse_case_insensitively() {
    assert_eq!(Role::parse("Operator"), Some(Role::Operator));
    assert_eq!(Role::parse("root"), None);
    assert!(Identity::anonymous_admin().roles.contains(&Role::Admin));
}
