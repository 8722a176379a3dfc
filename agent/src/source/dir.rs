//! The `dir:` source: plain Kubernetes manifests (Service, EndpointSlice,
//! Pod) in a directory, followed for changes. It is how headway runs
//! without a cluster.
//!
//! Loading never fails because of one bad manifest: each broken file or
//! document becomes a [`ManifestError`] and everything else still loads.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::Metadata;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Objects;
use crate::model::DEFAULT_NAMESPACE;

/// File name extensions read as manifests (any case).
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// A manifest file or document that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub path: PathBuf,
    /// 1-based index of the document in a multi-document file; 0 when the
    /// problem concerns the file (or directory) as a whole.
    pub document: usize,
    pub message: String,
}

impl ManifestError {
    fn whole(path: &Path, message: String) -> Self {
        Self {
            path: path.to_owned(),
            document: 0,
            message,
        }
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match self.document {
            0 => write!(f, "{path}: {}", self.message),
            n => write!(f, "{path} (document {n}): {}", self.message),
        }
    }
}

impl std::error::Error for ManifestError {}

/// Everything a directory held at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirSnapshot {
    /// All objects of all files, in path order.
    pub objects: Objects,
    pub errors: Vec<ManifestError>,
    /// The objects of each manifest file that was found, including broken
    /// ones (with whatever documents of them did load).
    pub files: BTreeMap<PathBuf, Objects>,
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file under `dir`, recursively,
/// in path order. Only a failure to read `dir` itself is an `Err`.
pub fn load_dir(dir: &Path) -> io::Result<DirSnapshot> {
    let mut snapshot = DirSnapshot::default();
    let mut paths = Vec::new();
    collect_manifests(dir, fs::read_dir(dir)?, &mut paths, &mut snapshot.errors);
    paths.sort();
    for path in paths {
        let objects = load_file(&path, &mut snapshot.errors);
        snapshot.objects.extend_from(&objects);
        snapshot.files.insert(path, objects);
    }
    Ok(snapshot)
}

/// Adds the manifest files among `entries` (the listing of `dir`) to
/// `paths`, recursing into subdirectories.
///
/// Hidden entries are skipped: a ConfigMap volume holds every file twice,
/// under `..data/` and a timestamped `..2024_…/` directory, and editors
/// leave dot-files behind. Symlinked directories are not followed, so there
/// are no loops; symlinked files are (a ConfigMap volume is made of them).
fn collect_manifests(
    dir: &Path,
    entries: fs::ReadDir,
    paths: &mut Vec<PathBuf>,
    errors: &mut Vec<ManifestError>,
) {
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                errors.push(ManifestError::whole(
                    dir,
                    format!("cannot list directory: {err}"),
                ));
                continue;
            }
        };
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => match fs::read_dir(&path) {
                Ok(sub) => collect_manifests(&path, sub, paths, errors),
                Err(err) => {
                    errors.push(ManifestError::whole(
                        &path,
                        format!("cannot read directory: {err}"),
                    ));
                }
            },
            Ok(_) if has_extension(&path, &EXTENSIONS) => paths.push(path),
            Ok(_) => {}
            Err(err) => errors.push(ManifestError::whole(&path, format!("cannot stat: {err}"))),
        }
    }
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    let ext = path.extension().and_then(OsStr::to_str).unwrap_or_default();
    extensions.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// The objects of one file; its problems go to `errors`.
fn load_file(path: &Path, errors: &mut Vec<ManifestError>) -> Objects {
    let mut objects = Objects::default();
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            errors.push(ManifestError::whole(path, format!("cannot read: {err}")));
            return objects;
        }
    };
    let documents = if has_extension(path, &["json"]) {
        json_documents(&text)
    } else {
        yaml_documents(&text)
    };
    for (index, document) in documents.into_iter().enumerate() {
        let mut problems = Vec::new();
        match document {
            Ok(value) => add_value(value, &mut objects, &mut problems),
            Err(problem) => problems.push(problem),
        }
        let document = index + 1;
        errors.extend(problems.into_iter().map(|message| ManifestError {
            path: path.to_owned(),
            document,
            message,
        }));
    }
    objects
}

/// A JSON file holds one document (none when blank).
fn json_documents(text: &str) -> Vec<Result<Value, String>> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    vec![serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))]
}

/// Parses each document of a YAML stream on its own, so that one broken
/// document cannot hide the others. (serde_yaml_ng's multi-document
/// iterator is no help there: after a syntax error it repeats that error
/// forever.) Empty documents parse to `Value::Null`.
fn yaml_documents(text: &str) -> Vec<Result<Value, String>> {
    split_yaml(text)
        .into_iter()
        .map(|(first_line, document)| {
            // Pad with blank lines so the parser's line numbers are the file's.
            let padded = "\n".repeat(first_line) + document;
            serde_yaml_ng::from_str(&padded).map_err(|e| format!("invalid YAML: {e}"))
        })
        .collect()
}

/// The documents of a YAML stream, each with its 0-based first line, split
/// at `---` lines (which YAML forbids inside a document). Text before the
/// first `---` is a document only if it holds more than comments, blank
/// lines and directives.
fn split_yaml(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 0, 0);
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        if is_document_start(line) && line_no > 0 {
            documents.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, line_no);
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    if documents
        .first()
        .is_some_and(|(_, first)| is_blank_yaml(first))
    {
        documents.remove(0);
    }
    documents
}

fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// Only comments, blank lines and directives (`%YAML`).
fn is_blank_yaml(text: &str) -> bool {
    text.lines()
        .map(str::trim_start)
        .all(|line| line.is_empty() || line.starts_with('#') || line.starts_with('%'))
}

/// What identifies a manifest's type and object.
struct Header {
    api_version: String,
    kind: String,
    name: Option<String>,
}

impl Header {
    fn of(value: &Value) -> Result<Header, String> {
        if !value.is_object() {
            return Err("not a Kubernetes object (expected a mapping)".to_owned());
        }
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(Header {
            kind: field("kind").ok_or("missing kind")?,
            api_version: field("apiVersion").ok_or("missing apiVersion")?,
            name: value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// `Service web`, for messages.
    fn describe(&self) -> String {
        format!(
            "{} {}",
            self.kind,
            self.name.as_deref().unwrap_or("<unnamed>")
        )
    }
}

/// Adds the object in `value` (or the items of a `List`) to `objects`;
/// records what was wrong with it in `problems`. Empty documents are
/// skipped, kinds headway does not read are ignored.
fn add_value(value: Value, objects: &mut Objects, problems: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    let header = match Header::of(&value) {
        Ok(header) => header,
        Err(problem) => {
            problems.push(problem);
            return;
        }
    };
    let result = match (header.api_version.as_str(), header.kind.as_str()) {
        ("v1", "List") => {
            add_list_items(value, objects, problems);
            return;
        }
        ("v1", "Service") => push_object(value, &mut objects.services),
        ("discovery.k8s.io/v1", "EndpointSlice") => push_object(value, &mut objects.slices),
        ("v1", "Pod") => push_object(value, &mut objects.pods),
        ("v1", "Node") => serde_json::from_value(value).map(|node| objects.nodes.push(node)),
        (api_version, kind) => {
            let name = header.name.as_deref().unwrap_or_default();
            tracing::debug!(
                api_version,
                kind,
                name,
                "ignoring a kind headway does not read"
            );
            Ok(())
        }
    };
    if let Err(err) = result {
        problems.push(format!("{}: {err}", header.describe()));
    }
}

/// The items of a `kind: List`, each like a document of its own.
fn add_list_items(value: Value, objects: &mut Objects, problems: &mut Vec<String>) {
    let items = match value {
        Value::Object(mut map) => map.remove("items").unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let items = match items {
        Value::Array(items) => items,
        Value::Null => return,
        _ => {
            problems.push("List: items is not a sequence".to_owned());
            return;
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let mut item_problems = Vec::new();
        add_value(item, objects, &mut item_problems);
        problems.extend(
            item_problems
                .into_iter()
                .map(|p| format!("items[{index}]: {p}")),
        );
    }
}

/// Deserializes a typed object, giving it the default namespace if it has
/// none (as `kubectl apply` would).
fn push_object<T>(value: Value, into: &mut Vec<T>) -> serde_json::Result<()>
where
    T: DeserializeOwned + Metadata<Ty = ObjectMeta>,
{
    let mut object: T = serde_json::from_value(value)?;
    let meta = object.metadata_mut();
    if meta.namespace.is_none() {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
    into.push(object);
    Ok(())
}

/// What each manifest file last held when it loaded without errors.
///
/// An editor saving a file, or a typo in it, must not make its objects
/// vanish from the datapath: a file with errors keeps contributing what it
/// held when it last loaded cleanly.
#[derive(Clone, Debug, Default)]
pub struct FileObjects {
    clean: BTreeMap<PathBuf, Objects>,
}

impl FileObjects {
    /// The objects to use for `snapshot`: per file, its fresh objects if it
    /// loaded cleanly, else its last clean objects (or, if it never loaded
    /// cleanly, whatever of it did load). Deleted files are forgotten, except
    /// under a directory that could not be read.
    pub fn merge(&mut self, snapshot: DirSnapshot) -> Objects {
        let DirSnapshot { files, errors, .. } = snapshot;
        let broken: BTreeSet<&Path> = errors.iter().map(|e| e.path.as_path()).collect();
        let mut used = BTreeMap::new();
        let mut clean = BTreeMap::new();
        // Files under an unreadable directory are unseen, not deleted.
        let unreadable: Vec<&Path> = broken
            .iter()
            .copied()
            .filter(|p| !files.contains_key(*p))
            .collect();
        for (path, objects) in &self.clean {
            if unreadable.iter().any(|dir| path.starts_with(dir)) {
                used.insert(path.clone(), objects.clone());
                clean.insert(path.clone(), objects.clone());
            }
        }
        for (path, fresh) in files {
            if !broken.contains(path.as_path()) {
                clean.insert(path.clone(), fresh.clone());
                used.insert(path, fresh);
            } else if let Some(previous) = self.clean.remove(&path) {
                clean.insert(path.clone(), previous.clone());
                used.insert(path, previous);
            } else {
                used.insert(path, fresh);
            }
        }
        self.clean = clean;
        let mut out = Objects::default();
        used.values().for_each(|objects| out.extend_from(objects));
        out
    }
}

/// Follows changes under a directory for as long as it lives.
pub struct DirWatcher {
    // Dropping the watcher stops the notifications.
    _watcher: RecommendedWatcher,
}

impl DirWatcher {
    /// Watches `dir` recursively. The receiver gets `()` whenever something
    /// under it changes; bursts coalesce into one pending notification, so
    /// a slow consumer reloads once, not once per event.
    pub fn new(dir: &Path) -> notify::Result<(DirWatcher, mpsc::Receiver<()>)> {
        let (tx, rx) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            if is_change(&event) {
                // Full: a notification is already pending. Closed: nobody
                // listens any more. Neither needs handling.
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    tracing::debug!("manifest change after the receiver was dropped");
                }
            }
        })?;
        watcher.watch(dir, RecursiveMode::Recursive)?;
        Ok((DirWatcher { _watcher: watcher }, rx))
    }
}

/// Whether an event may change what [`load_dir`] reads. Opening and reading
/// files is not a change (and `load_dir`'s own reads would otherwise cause
/// reloads forever); closing a file written to is. A watch error (such as
/// an event queue overflow) may have hidden a change, so it counts as one.
fn is_change(event: &notify::Result<Event>) -> bool {
    match event {
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(err) => {
            tracing::warn!(error = %err, "watching the manifest directory failed; reloading");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &Path, relative: &str, text: &str) -> PathBuf {
        let path = dir.join(relative);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, text).expect("write manifest");
        path
    }

    fn names<T: Metadata<Ty = ObjectMeta>>(objects: &[T]) -> Vec<String> {
        objects
            .iter()
            .map(|o| {
                let meta = o.metadata();
                format!(
                    "{}/{}",
                    meta.namespace.as_deref().unwrap_or("?"),
                    meta.name.as_deref().unwrap_or("?")
                )
            })
            .collect()
    }

    const STATEFULSET: &str = r#"# A database StatefulSet's headless service.
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: data
  annotations: {headway.dev/policy: weighted}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc
  namespace: data
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
endpoints:
  - {addresses: [10.0.0.10], hostname: db-0, targetRef: {kind: Pod, name: db-0}}
  - {addresses: [10.0.0.11], hostname: db-1, targetRef: {kind: Pod, name: db-1}}
  - addresses: [10.0.0.12]
    hostname: db-2
    conditions: {ready: false, serving: false, terminating: true}
    targetRef: {kind: Pod, name: db-2}
---
---
# only a comment
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: data}
spec: {serviceName: db}
"#;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: data
  labels: {headway.dev/weight: "300"}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-1
  namespace: data
  labels: {headway.dev/drain: "true"}
"#;

    #[test]
    fn loads_manifests_recursively_in_path_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "b/pods.yml", PODS);
        write(tmp.path(), "a-db.yaml", STATEFULSET);
        write(
            tmp.path(),
            "c.json",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "json"}, "spec": {"clusterIP": "None"}}"#,
        );
        write(tmp.path(), "notes.txt", "kind: Service\n");
        write(tmp.path(), ".hidden.yaml", "not: [valid\n");
        write(tmp.path(), "..data/copy.yaml", STATEFULSET);

        let snapshot = load_dir(tmp.path()).expect("load");
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        assert_eq!(
            names(&snapshot.objects.services),
            ["data/db", "default/json"]
        );
        assert_eq!(names(&snapshot.objects.slices), ["data/db-abc"]);
        assert_eq!(names(&snapshot.objects.pods), ["data/db-0", "data/db-1"]);
        let files: Vec<PathBuf> = snapshot.files.keys().cloned().collect();
        let expected: Vec<PathBuf> = ["a-db.yaml", "b/pods.yml", "c.json"]
            .iter()
            .map(|f| tmp.path().join(f))
            .collect();
        assert_eq!(files, expected);
    }

    #[test]
    fn loaded_objects_feed_the_model() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "db.yaml", STATEFULSET);
        write(tmp.path(), "pods.yaml", PODS);
        let snapshot = load_dir(tmp.path()).expect("load");
        let (state, warnings) = snapshot.objects.desired_state();
        assert!(warnings.is_empty(), "{warnings:?}");
        let db = &state.services[&crate::model::ServiceKey::new("data", "db")];
        assert_eq!(db.policy, Some(crate::model::Policy::Weighted));
        let by_host: Vec<(Option<&str>, bool, u32, bool)> = db
            .endpoints
            .values()
            .map(|e| (e.hostname.as_deref(), e.drained, e.weight, e.terminating))
            .collect();
        assert_eq!(
            by_host,
            [
                (Some("db-0"), false, 300, false),
                (Some("db-1"), true, 100, false),
                (Some("db-2"), false, 100, true)
            ]
        );
    }

    #[test]
    fn namespace_defaults_to_default() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(
            tmp.path(),
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: None}\n",
        );
        let snapshot = load_dir(tmp.path()).expect("load");
        assert_eq!(
            snapshot.objects.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn bad_files_and_documents_are_reported_and_the_rest_loads() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let broken = write(
            tmp.path(),
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n",
        );
        let mixed = write(
            tmp.path(),
            "mixed.yaml",
            r#"apiVersion: v1
kind: Service
metadata: {name: good-1}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  clusterIP: None
  ports: [{port: not-a-number}]
---
metadata: {name: kindless}
---
key: [unclosed
---
apiVersion: v1
kind: Service
metadata: {name: good-2}
spec: {clusterIP: None}
"#,
        );
        write(
            tmp.path(),
            "z-good.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
        );

        let snapshot = load_dir(tmp.path()).expect("load");
        assert_eq!(
            names(&snapshot.objects.services),
            ["default/good-1", "default/good-2"]
        );
        assert_eq!(names(&snapshot.objects.pods), ["default/p"]);
        let where_: Vec<(&Path, usize)> = snapshot
            .errors
            .iter()
            .map(|e| (e.path.as_path(), e.document))
            .collect();
        assert_eq!(
            where_,
            [
                (broken.as_path(), 1),
                (mixed.as_path(), 2),
                (mixed.as_path(), 3),
                (mixed.as_path(), 4)
            ]
        );
        let text: Vec<String> = snapshot.errors.iter().map(ToString::to_string).collect();
        assert!(
            text[0].starts_with(&format!("{} (document 1): invalid YAML", broken.display())),
            "{text:?}"
        );
        assert!(
            text[0].contains("line 3"),
            "line numbers are the file's: {text:?}"
        );
        assert!(
            text[1].contains("Service bad") && text[1].contains("invalid type"),
            "{text:?}"
        );
        assert!(text[2].contains("missing kind"), "{text:?}");
        assert!(
            text[3].contains("line 15"),
            "line numbers are the file's: {text:?}"
        );
    }

    #[test]
    fn kind_list_expands_items() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write(
            tmp.path(),
            "list.yaml",
            r#"apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: listed, namespace: ns}
    spec: {clusterIP: None}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: listed-1, labels: {kubernetes.io/service-name: listed}}
    addressType: IPv4
    endpoints: [{addresses: [10.1.1.1]}]
  - apiVersion: v1
    kind: Pod
    metadata: {name: broken}
    spec: {containers: 3}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: ignored}
"#,
        );
        let snapshot = load_dir(tmp.path()).expect("load");
        assert_eq!(names(&snapshot.objects.services), ["ns/listed"]);
        assert_eq!(names(&snapshot.objects.slices), ["default/listed-1"]);
        assert!(snapshot.objects.pods.is_empty());
        assert_eq!(snapshot.errors.len(), 1, "{:?}", snapshot.errors);
        assert_eq!(
            (
                snapshot.errors[0].path.as_path(),
                snapshot.errors[0].document
            ),
            (path.as_path(), 1)
        );
        assert!(
            snapshot.errors[0]
                .message
                .starts_with("items[2]: Pod broken:"),
            "{:?}",
            snapshot.errors
        );
    }

    #[test]
    fn missing_directory_is_an_io_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(load_dir(&tmp.path().join("absent")).is_err());
    }

    #[test]
    fn split_yaml_counts_documents_like_yaml() {
        let docs = |text| {
            split_yaml(text)
                .into_iter()
                .map(|(line, _)| line)
                .collect::<Vec<_>>()
        };
        assert_eq!(docs(""), Vec::<usize>::new());
        assert_eq!(docs("# just a comment\n"), Vec::<usize>::new());
        assert_eq!(docs("a: 1\n"), [0]);
        assert_eq!(docs("---\na: 1\n"), [0]);
        assert_eq!(docs("# head\n---\na: 1\n--- \nb: 2\n---\n"), [1, 3, 5]);
        assert_eq!(
            docs("a: |\n  ---\nb: ---x\n"),
            [0],
            "indented or glued `---` is content"
        );
    }

    #[test]
    fn file_objects_keep_the_last_clean_version_of_a_broken_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let service = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: None}}\n"
            )
        };
        write(tmp.path(), "a.yaml", &service("a1"));
        write(tmp.path(), "b.yaml", &service("b1"));
        let mut last_good = FileObjects::default();
        let merged = last_good.merge(load_dir(tmp.path()).expect("load"));
        assert_eq!(names(&merged.services), ["default/a1", "default/b1"]);

        // a.yaml broken mid-edit, b.yaml changed: a keeps its last clean objects.
        write(tmp.path(), "a.yaml", &(service("a2") + "---\nbad: [\n"));
        write(tmp.path(), "b.yaml", &service("b2"));
        let merged = last_good.merge(load_dir(tmp.path()).expect("load"));
        assert_eq!(names(&merged.services), ["default/a1", "default/b2"]);

        // Fixed: the new version counts; deleted: it is forgotten.
        write(tmp.path(), "a.yaml", &service("a3"));
        fs::remove_file(tmp.path().join("b.yaml")).expect("rm");
        let merged = last_good.merge(load_dir(tmp.path()).expect("load"));
        assert_eq!(names(&merged.services), ["default/a3"]);

        // A file that never loaded cleanly contributes what did load.
        write(tmp.path(), "c.yaml", &(service("c1") + "---\nbad: [\n"));
        let merged = last_good.merge(load_dir(tmp.path()).expect("load"));
        assert_eq!(names(&merged.services), ["default/a3", "default/c1"]);
    }

    #[test]
    fn manifest_error_display() {
        let error = |document| ManifestError {
            path: "/m/x.yaml".into(),
            document,
            message: "boom".into(),
        };
        assert_eq!(error(2).to_string(), "/m/x.yaml (document 2): boom");
        assert_eq!(error(0).to_string(), "/m/x.yaml: boom");
    }

    #[test]
    fn reads_are_not_changes() {
        let event = |kind| Ok(Event::new(kind));
        assert!(!is_change(&event(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        )))));
        assert!(!is_change(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        )))));
        assert!(is_change(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        )))));
        assert!(is_change(&event(EventKind::Modify(
            notify::event::ModifyKind::Any
        ))));
        assert!(is_change(&Err(notify::Error::generic("overflow"))));
    }

    #[tokio::test]
    async fn watcher_fires_on_a_file_write() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "sub/a.yaml", "");
        let (_watcher, mut changes) = DirWatcher::new(tmp.path()).expect("watch");

        write(tmp.path(), "sub/a.yaml", PODS);
        let fired = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert_eq!(fired, Ok(Some(())), "no notification within 5s");

        // Our own reads must not look like changes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while changes.try_recv().is_ok() {}
        load_dir(tmp.path()).expect("load");
        let spurious = tokio::time::timeout(Duration::from_millis(300), changes.recv()).await;
        assert!(
            spurious.is_err(),
            "reading the directory triggered a reload"
        );
    }
}
