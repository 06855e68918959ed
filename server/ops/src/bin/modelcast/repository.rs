//! `modelcast root …` and re-signing: the repository's root shown, rotated (signed offline by
//! old and new keys), pushed; the targets and every hash bin re-signed.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use modelcast_ops::client::Client;
use modelcast_server::{keyset, unix_now};

use crate::parse_kv;

#[derive(Subcommand, Debug)]
pub(crate) enum RootCommand {
    /// Print a root's version, expiry, roles, keys and thresholds.
    Show {
        /// The root file (default: the server's current root).
        root: Option<PathBuf>,
    },
    /// Write the next root version with keys added, revoked or thresholds changed
    /// (unsigned: sign it with `root sign` by a threshold of old and new root keys).
    Rotate {
        /// The current root (default: the server's, verified from `--trusted`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The operators' own root file, from which the server's chain is verified.
        #[arg(long, default_value = "./keys/root.json")]
        trusted: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Add a key: `ROLE=FILE` (a key file or a hex public key file; repeatable).
        #[arg(long = "add", value_parser = parse_kv)]
        add: Vec<(String, String)>,
        /// Revoke a key: `ROLE=KEYID` (a unique key id prefix is enough; repeatable).
        #[arg(long = "revoke", value_parser = parse_kv)]
        revoke: Vec<(String, String)>,
        /// Set a threshold: `ROLE=N` (repeatable).
        #[arg(long = "threshold", value_parser = parse_kv)]
        threshold: Vec<(String, String)>,
        /// Expiry in days from now.
        #[arg(long)]
        expires_days: Option<i64>,
    },
    /// Add the signature of one key file to a root (each holder signs in turn).
    Sign {
        /// The root file (signed in place).
        root: PathBuf,
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Make the server trust the next root and send it to every device, with the targets
    /// re-signed by the given targets keys when those changed.
    Push {
        /// The signed next root.
        root: PathBuf,
        /// Targets key files to re-sign the current targets with (repeatable).
        #[arg(long = "targets-key")]
        targets_keys: Vec<PathBuf>,
        /// The operators' own root file, from which the server's targets are verified
        /// before they are re-signed.
        #[arg(long, default_value = "./keys/root.json")]
        trusted: PathBuf,
        /// Who rotates.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
}

/// Re-signs the top-level targets and every hash bin with `keys` (the repository verified
/// from the operators' `root`) and hands them to the server; returns how many bins.
pub(crate) fn resign(
    client: &Client,
    root: &modelcast_proto::metadata::Signed,
    keys: &[modelcast_proto::keys::SigningKey],
    by: String,
) -> anyhow::Result<usize> {
    let signers: Vec<_> = keys.iter().collect();
    let repo = modelcast_ops::signing::Repository::open(client, root)?;
    let upload = repo.resign(&signers, unix_now())?;
    let bins = upload.delegated.len();
    client.publish(&modelcast_server::api::PublishRequest {
        upload,
        published_by: by,
        key_escrow: Default::default(),
    })?;
    Ok(bins)
}

pub(crate) fn root_command(client: &Client, cmd: RootCommand) -> anyhow::Result<()> {
    use modelcast_proto::metadata::{Root, Signed, Targets};
    let load = |path: &Option<PathBuf>| -> anyhow::Result<Signed> {
        Ok(match path {
            Some(p) => keyset::read_root(p)?,
            None => client.root()?,
        })
    };
    let write = |path: &PathBuf, root: &Signed| -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(root)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    match cmd {
        RootCommand::Show { root } => {
            let env = load(&root)?;
            let doc: Root = env.parse("root")?;
            println!("root version {} expires {}", doc.version, doc.expires);
            for (role, spec) in &doc.roles {
                println!(
                    "  {role}: {} of {} key(s)",
                    spec.threshold,
                    spec.keyids.len()
                );
                for id in &spec.keyids {
                    let signed = env.signatures.iter().any(|s| &s.keyid == id);
                    let mark = if role == "root" && signed {
                        " (signed this root)"
                    } else {
                        ""
                    };
                    println!("    {id}{mark}");
                }
            }
        }
        RootCommand::Rotate {
            from,
            trusted,
            out,
            add,
            revoke,
            threshold,
            expires_days,
        } => {
            let current = match &from {
                Some(p) => keyset::read_root(p)?,
                None => client.verified_root(&keyset::read_root(&trusted)?)?,
            };
            let change = keyset::RootChange {
                add: add
                    .into_iter()
                    .map(|(role, file)| Ok((role, keyset::read_public(file.as_ref())?)))
                    .collect::<anyhow::Result<_>>()?,
                revoke,
                thresholds: threshold
                    .into_iter()
                    .map(|(role, n)| Ok((role, n.parse()?)))
                    .collect::<anyhow::Result<_>>()?,
                expires: expires_days.map(|d| unix_now() + d * 24 * 3600),
            };
            let next = keyset::next_root(&current, &change, unix_now())?;
            write(&out, &next)?;
            let doc: Root = next.parse("root")?;
            println!(
                "{}: root version {} (unsigned): sign it with a threshold of the old and of the new root keys",
                out.display(),
                doc.version
            );
        }
        RootCommand::Sign { root, key } => {
            let mut env = keyset::read_root(&root)?;
            let key = keyset::read_key(&key)?;
            keyset::add_signature(&mut env, &key)?;
            write(&root, &env)?;
            println!("{}: {} signature(s)", root.display(), env.signatures.len());
        }
        RootCommand::Push {
            root,
            targets_keys,
            trusted,
            by,
        } => {
            let next = keyset::read_root(&root)?;
            let targets = if targets_keys.is_empty() {
                None
            } else {
                let keys = targets_keys
                    .iter()
                    .map(|p| keyset::read_key(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let current = client
                    .verified_targets(&keyset::read_root(&trusted)?)?
                    .context("no targets published yet")?;
                let mut doc: Targets = current.parse("targets")?;
                doc.version += 1;
                let signers: Vec<_> = keys.iter().collect();
                Some(Signed::sign(&doc, &signers))
            };
            let new_keys = targets.is_some();
            let answer = client.rotate_root(&modelcast_server::api::RootRequest {
                root: next,
                targets,
                by: by.clone(),
            })?;
            println!("{answer}");
            if new_keys {
                // The bins follow the new targets keys at once: a revoked key signs nothing.
                let keys = targets_keys
                    .iter()
                    .map(|p| keyset::read_key(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let bins = resign(client, &keyset::read_root(&trusted)?, &keys, by)?;
                println!("re-signed the top-level targets and {bins} bin(s) with the new keys");
            }
        }
    }
    Ok(())
}
