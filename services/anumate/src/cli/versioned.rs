//! The commands every kind of versioned document shares (`anumate capsule …`
//! and `anumate policy …`): push a file as a new version, get one version,
//! list, list versions, publish and deprecate. A kind is declared with
//! [`versioned_kind!`] (its client, its calls, its messages) and implements
//! [`Kind`] for what it does its own way (listing, printing); the command
//! bodies here are written once.

use std::path::Path;

use anumate_auth::BearerToken;
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;

use super::{Connection, Failure, Output, read_file, show};

/// `get`'s version selector.
#[derive(Args, Debug)]
pub struct VersionArg {
    /// Version number, `published` or `latest`.
    #[arg(long, short = 'v', default_value = "published")]
    pub version: String,
}

/// `list`'s page size.
#[derive(Args, Debug)]
pub struct PageSizeArg {
    /// Page size (all pages are fetched).
    #[arg(long, default_value_t = 100)]
    pub page_size: i32,
}

/// One stored version, as the shared output shows it.
pub(crate) trait StoredVersion {
    /// The document's name.
    fn name(&self) -> &str;
    /// The version number.
    fn number(&self) -> i32;
    /// `draft`, `published`, `deprecated` (`unknown` for anything else).
    fn status(&self) -> &'static str;
    /// `sha256:…` of the canonical content.
    fn content_hash(&self) -> &str;
    /// The source as it was pushed.
    fn source(&self) -> &str;
}

/// A document (a name and all its versions), as the shared output shows it.
pub(crate) trait StoredDocument {
    /// What a conditional change must carry to apply.
    fn etag(&self) -> &str;
}

/// An answer carrying one version and its document (push, get, publish,
/// deprecate); printed as it came with `-o json`.
pub(crate) trait VersionReply: Serialize {
    /// The kind's version message.
    type Version: StoredVersion;
    /// The kind's document message.
    type Document: StoredDocument;
    /// The version the call was about.
    fn version(&self) -> Option<&Self::Version>;
    /// The document after the call.
    fn document(&self) -> Option<&Self::Document>;
}

/// The answer to a push, which also says whether it stored a new version.
pub(crate) trait PushReply: VersionReply {
    /// False when the content was identical to an existing version.
    fn created(&self) -> bool;
    /// What the server warns about (none for kinds without warnings).
    fn warnings(&self) -> &[String] {
        &[]
    }
}

/// Declares a kind of versioned document: implements [`Calls`] for `$kind`
/// with the generated client `$client` and its RPCs, and the accessor traits
/// for its messages, whose field names the protos keep alike: a version's
/// `name`, `version`, `status`, `content_hash` and its source field `$source`
/// (the push request's too), a document's `etag`, each reply's `version` and
/// the document in its field `$field`, the push reply's `created`.
macro_rules! versioned_kind {
    (
        $kind:ty: $client:ident,
        version: $version:ty { source: $source:ident, status: $status:path },
        document: $document:ty { in: $field:ident },
        push: $push_rpc:ident($push:ty) -> $pushed:ty,
        get: $get_rpc:ident($get:ty) -> $got:ty,
        publish: $publish_rpc:ident($publish:ty) -> $published:ty,
        deprecate: $deprecate_rpc:ident($deprecate:ty) -> $deprecated:ty
        $(, warnings: $warnings:ident)? $(,)?
    ) => {
        impl $crate::cli::versioned::Calls for $kind {
            type Client = $client<$crate::cli::Authed>;
            type Version = $version;
            type Document = $document;
            type Pushed = $pushed;
            type Got = $got;
            type Published = $published;
            type Deprecated = $deprecated;

            fn client(
                channel: tonic::transport::Channel,
                token: anumate_auth::BearerToken,
            ) -> Self::Client {
                $client::with_interceptor(channel, token)
            }

            async fn push(
                client: &mut Self::Client,
                push: $crate::cli::versioned::Push,
            ) -> Result<$pushed, $crate::cli::Failure> {
                type Request = $push;
                let request = Request {
                    $source: push.source,
                    source_name: push.source_name,
                    etag: push.etag,
                    publish: push.publish,
                };
                Ok(client.$push_rpc(request).await?.into_inner())
            }

            async fn get(
                client: &mut Self::Client,
                name: String,
                version: String,
            ) -> Result<$got, $crate::cli::Failure> {
                type Request = $get;
                let request = Request { name, version };
                Ok(client.$get_rpc(request).await?.into_inner())
            }

            async fn publish(
                client: &mut Self::Client,
                change: $crate::cli::versioned::Change,
            ) -> Result<$published, $crate::cli::Failure> {
                type Request = $publish;
                let request = Request {
                    name: change.name,
                    version: change.version,
                    etag: change.etag,
                };
                Ok(client.$publish_rpc(request).await?.into_inner())
            }

            async fn deprecate(
                client: &mut Self::Client,
                change: $crate::cli::versioned::Change,
            ) -> Result<$deprecated, $crate::cli::Failure> {
                type Request = $deprecate;
                let request = Request {
                    name: change.name,
                    version: change.version,
                    etag: change.etag,
                };
                Ok(client.$deprecate_rpc(request).await?.into_inner())
            }
        }

        impl $crate::cli::versioned::StoredVersion for $version {
            fn name(&self) -> &str {
                &self.name
            }
            fn number(&self) -> i32 {
                self.version
            }
            fn status(&self) -> &'static str {
                $status(self.status)
            }
            fn content_hash(&self) -> &str {
                &self.content_hash
            }
            fn source(&self) -> &str {
                &self.$source
            }
        }

        impl $crate::cli::versioned::StoredDocument for $document {
            fn etag(&self) -> &str {
                &self.etag
            }
        }

        impl $crate::cli::versioned::PushReply for $pushed {
            fn created(&self) -> bool {
                self.created
            }
            $(
            fn warnings(&self) -> &[String] {
                &self.$warnings
            }
            )?
        }

        $crate::cli::versioned::versioned_kind!(@reply $version, $document, $field: $pushed, $got, $published, $deprecated);
    };
    (@reply $version:ty, $document:ty, $field:ident: $($reply:ty),+) => {$(
        impl $crate::cli::versioned::VersionReply for $reply {
            type Version = $version;
            type Document = $document;
            fn version(&self) -> Option<&$version> {
                self.version.as_ref()
            }
            fn document(&self) -> Option<&$document> {
                self.$field.as_ref()
            }
        }
    )+};
}
pub(crate) use versioned_kind;

/// What a push sends.
pub(crate) struct Push {
    /// The file's text.
    pub source: String,
    /// The file's name, which the server positions its errors in.
    pub source_name: String,
    /// Only if the document's etag is still this ("" for unconditionally).
    pub etag: String,
    /// Publish the new version at once.
    pub publish: bool,
}

/// What a status change (publish, deprecate) sends.
pub(crate) struct Change {
    /// The document's name.
    pub name: String,
    /// The version number.
    pub version: i32,
    /// Only if the document's etag is still this ("" for unconditionally).
    pub etag: String,
}

/// The calls every kind of versioned document has under its own names, and
/// its messages; implemented by [`versioned_kind!`] from the kind's
/// declaration.
pub(crate) trait Calls {
    /// The generated client over an authenticated channel.
    type Client;
    /// The version message.
    type Version: StoredVersion;
    /// The document message.
    type Document: StoredDocument;
    /// The answer to a push.
    type Pushed: PushReply<Version = Self::Version, Document = Self::Document>;
    /// The answer to a get.
    type Got: VersionReply<Version = Self::Version, Document = Self::Document>;
    /// The answer to a publish.
    type Published: VersionReply<Version = Self::Version, Document = Self::Document>;
    /// The answer to a deprecate.
    type Deprecated: VersionReply<Version = Self::Version, Document = Self::Document>;

    /// Wraps a channel in the generated client.
    fn client(channel: Channel, token: BearerToken) -> Self::Client;
    /// Stores a new version.
    async fn push(client: &mut Self::Client, push: Push) -> Result<Self::Pushed, Failure>;
    /// One version: a number, `published` or `latest`.
    async fn get(
        client: &mut Self::Client,
        name: String,
        version: String,
    ) -> Result<Self::Got, Failure>;
    /// Publishes a version.
    async fn publish(client: &mut Self::Client, change: Change)
    -> Result<Self::Published, Failure>;
    /// Deprecates a version.
    async fn deprecate(
        client: &mut Self::Client,
        change: Change,
    ) -> Result<Self::Deprecated, Failure>;
}

/// What a kind of versioned document does its own way: how it lists (its
/// filter, its paging) and how its version and tables print.
pub(crate) trait Kind: Calls {
    /// What `list` filters by besides the page size.
    type Filter;
    /// What `list` prints with `-o json`.
    type Listed: Serialize;
    /// What `versions` prints with `-o json`.
    type Versions: Serialize;

    /// The documents, `page_size` at a time.
    async fn list(
        client: &mut Self::Client,
        filter: Self::Filter,
        page_size: i32,
    ) -> Result<Self::Listed, Failure>;
    /// A document's versions.
    async fn versions(client: &mut Self::Client, name: String) -> Result<Self::Versions, Failure>;

    /// Prints one version (and the document's etag) for `get`.
    fn print_version(document: Option<&Self::Document>, version: &Self::Version);
    /// Prints the table of `list`.
    fn print_list(listed: &Self::Listed);
    /// Prints the table of `versions`.
    fn print_versions(versions: &Self::Versions);
}

/// `push FILE [--publish] [--etag E]`.
pub(crate) async fn push<K: Kind>(
    conn: &Connection,
    file: &Path,
    publish: bool,
    etag: String,
) -> Result<(), Failure> {
    let source = read_file(file)?;
    let mut client = conn.client(K::client).await?;
    let push = Push {
        source,
        source_name: file.display().to_string(),
        etag,
        publish,
    };
    let reply = K::push(&mut client, push).await?;
    show(conn.output, &reply, |reply| {
        let Some(v) = reply.version() else { return };
        let verb = if reply.created() {
            "pushed"
        } else {
            "unchanged: identical to"
        };
        println!(
            "{verb} {} version {} ({}) {}",
            v.name(),
            v.number(),
            v.status(),
            v.content_hash()
        );
        if let Some(d) = reply.document() {
            println!("etag {}", d.etag());
        }
    });
    for warning in reply.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// `get NAME [-v VERSION] [--source]`.
pub(crate) async fn get<K: Kind>(
    conn: &Connection,
    name: String,
    version: String,
    source_only: bool,
) -> Result<(), Failure> {
    let mut client = conn.client(K::client).await?;
    let reply = K::get(&mut client, name, version).await?;
    show(conn.output, &reply, |reply| {
        let Some(v) = reply.version() else { return };
        if source_only {
            print!("{}", v.source());
        } else {
            K::print_version(reply.document(), v);
        }
    });
    Ok(())
}

/// `list`: every page, then one table.
pub(crate) async fn list<K: Kind>(
    conn: &Connection,
    filter: K::Filter,
    page_size: i32,
) -> Result<(), Failure> {
    let mut client = conn.client(K::client).await?;
    let listed = K::list(&mut client, filter, page_size).await?;
    show(conn.output, &listed, K::print_list);
    Ok(())
}

/// `versions NAME`.
pub(crate) async fn versions<K: Kind>(conn: &Connection, name: String) -> Result<(), Failure> {
    let mut client = conn.client(K::client).await?;
    let versions = K::versions(&mut client, name).await?;
    show(conn.output, &versions, K::print_versions);
    Ok(())
}

/// The status a version is moved to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Transition {
    /// `publish NAME VERSION`.
    Publish,
    /// `deprecate NAME VERSION`.
    Deprecate,
}

/// `publish|deprecate NAME VERSION [--etag E]`, printed as `VERB NAME version
/// N (etag E)`. `etag` is `None` for a kind whose command has no `--etag`:
/// it sends none and prints none.
pub(crate) async fn transition<K: Kind>(
    conn: &Connection,
    to: Transition,
    name: String,
    version: i32,
    etag: Option<String>,
) -> Result<(), Failure> {
    let mut client = conn.client(K::client).await?;
    let with_etag = etag.is_some();
    let change = Change {
        name,
        version,
        etag: etag.unwrap_or_default(),
    };
    match to {
        Transition::Publish => {
            let reply = K::publish(&mut client, change).await?;
            show_transition(conn.output, "published", &reply, with_etag);
        }
        Transition::Deprecate => {
            let reply = K::deprecate(&mut client, change).await?;
            show_transition(conn.output, "deprecated", &reply, with_etag);
        }
    }
    Ok(())
}

fn show_transition<R: VersionReply>(out: Output, verb: &str, reply: &R, with_etag: bool) {
    show(out, reply, |reply| {
        match (reply.version(), reply.document()) {
            (Some(v), Some(d)) if with_etag => println!(
                "{verb} {} version {} (etag {})",
                v.name(),
                v.number(),
                d.etag()
            ),
            (Some(v), _) if !with_etag => println!("{verb} {} version {}", v.name(), v.number()),
            _ => {}
        }
    });
}
