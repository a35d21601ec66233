//! A held app build's workspace as the files API sees it: listing and reading (`ListFiles`,
//! `ReadFile`) and the snapshot kept in R2 (`snapshot`, `restore`).
//!
//! Everything here is sandboxed to the worktree: paths are checked again with
//! [`workspace_path`], no symbolic link is ever followed (one is listed as `symlink`, and a path
//! through one is refused), and a read verifies through `/proc/self/fd` that the file it opened
//! is inside the worktree, so a directory swapped for a link mid-request reads nothing outside.
//! `.git` is never shown. All functions block: call them from `spawn_blocking`.

use std::collections::VecDeque;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kiln_schemas::app::{
    workspace_path, FileContent, FileEntry, FileStructure, SnapshotFile, WorkspaceSnapshot,
    MAX_FILE_BYTES, WORKSPACE_ROOT,
};
use kiln_schemas::runner::MAX_SNAPSHOT_BYTES;

/// Directory names never listed, read or snapshotted.
const HIDDEN: &[&str] = &[".git"];

/// Directories a snapshot leaves out (not listed as omitted either): installed dependencies and
/// caches, which a build recreates and which would crowd the app's own files out of the budget.
const NOT_SNAPSHOTTED: &[&str] = &[
    "node_modules",
    ".venv",
    "venv",
    "__pycache__",
    ".next",
    ".cache",
];

/// Bytes of a snapshot kept for its `omitted` list and its JSON frame.
const OMITTED_RESERVE: usize = 512 * 1024;

/// A refusal, worded for the client (no host paths, no OS error text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesError(pub String);

impl std::fmt::Display for FilesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilesError {}

fn refuse(msg: impl Into<String>) -> FilesError {
    FilesError(msg.into())
}

/// Checks a request's path: absolute (`/app/...`) or relative to `/app`. Answers it relative,
/// `/`-separated, `""` for the root.
pub fn checked_path(path: &str) -> Result<String, FilesError> {
    let abs = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{WORKSPACE_ROOT}/{path}")
    };
    let rel = workspace_path(&abs).map_err(FilesError)?;
    if rel.split('/').any(|seg| HIDDEN.contains(&seg)) {
        return Err(refuse("no such file or directory"));
    }
    Ok(rel)
}

fn display_path(rel: &str) -> String {
    if rel.is_empty() {
        WORKSPACE_ROOT.to_string()
    } else {
        format!("{WORKSPACE_ROOT}/{rel}")
    }
}

/// Walks `rel` under `dir` one component at a time without following links. Answers the full
/// path and the last component's metadata (`None` when it does not exist).
fn resolve(dir: &Path, rel: &str) -> Result<(PathBuf, Option<Metadata>), FilesError> {
    let mut at = dir.to_path_buf();
    let mut meta = fs::symlink_metadata(&at)
        .map_err(|_| refuse("this job has no workspace on this runner"))?;
    if !meta.is_dir() {
        return Err(refuse("this job has no workspace on this runner"));
    }
    let segs: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segs.iter().enumerate() {
        at.push(seg);
        meta = match fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((at, None)),
            Err(_) => return Err(refuse("no such file or directory")),
        };
        if meta.file_type().is_symlink() {
            return Err(refuse(format!(
                "{} is a symbolic link",
                display_path(&segs[..=i].join("/"))
            )));
        }
        if i + 1 < segs.len() && !meta.is_dir() {
            return Err(refuse("no such file or directory"));
        }
    }
    Ok((at, Some(meta)))
}

fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_symlink() {
        Some("symlink")
    } else if t.is_dir() {
        Some("directory")
    } else if t.is_file() {
        Some("file")
    } else {
        None
    }
}

/// The entries of the directory `at` (under the workspace `base`), hidden names left out,
/// directories first then by name. The directory is opened without following a link and read
/// through its descriptor, so one swapped for a link after the checks lists nothing outside.
fn entries(base: &Path, at: &Path) -> Vec<(String, Metadata)> {
    let Ok(handle) = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(at)
    else {
        return Vec::new();
    };
    let Ok(opened) = inside(base, &handle) else {
        return Vec::new();
    };
    let Ok(rd) = fs::read_dir(opened.as_deref().unwrap_or(at)) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Metadata)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if HIDDEN.contains(&name.as_str()) {
                return None;
            }
            let meta = fs::symlink_metadata(e.path()).ok()?;
            kind_of(&meta)?;
            Some((name, meta))
        })
        .collect();
    out.sort_by(|(a, am), (b, bm)| bm.is_dir().cmp(&am.is_dir()).then_with(|| a.cmp(b)));
    out
}

/// `files/structure/`: the tree under `path`, breadth first (the shallow levels are complete
/// before a deeper one starts) until `limit` entries are listed.
pub fn list(dir: &Path, path: &str, limit: u32) -> Result<FileStructure, FilesError> {
    let rel = checked_path(path)?;
    let (root, meta) = resolve(dir, &rel)?;
    match meta {
        None => return Err(refuse(format!("{} does not exist", display_path(&rel)))),
        Some(m) if !m.is_dir() => {
            return Err(refuse(format!("{} is not a directory", display_path(&rel))))
        }
        Some(_) => {}
    }
    let limit = limit.max(1) as usize;
    // Entries in the order they were found (a parent before its children), and the ids of
    // each directory's listed children (`None`: not reached within the limit).
    let mut found: Vec<Option<FileEntry>> = Vec::new();
    let mut kids: Vec<Option<Vec<usize>>> = Vec::new();
    let mut top: Vec<usize> = Vec::new();
    // (the directory's id, `None` for the top; its path on disk; its relative path)
    let mut queue: VecDeque<(Option<usize>, PathBuf, String)> = VecDeque::new();
    queue.push_back((None, root, rel));
    let mut truncated = false;
    while let Some((parent, disk, rel)) = queue.pop_front() {
        let mut ids = Vec::new();
        for (name, meta) in entries(dir, &disk) {
            if found.len() >= limit {
                truncated = true;
                break;
            }
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let kind = kind_of(&meta).unwrap_or("file");
            let id = found.len();
            if kind == "directory" {
                queue.push_back((Some(id), disk.join(&name), child_rel.clone()));
            }
            found.push(Some(FileEntry {
                name,
                path: display_path(&child_rel),
                kind: kind.to_string(),
                size: (kind == "file").then_some(meta.len()),
                children: None,
            }));
            kids.push(None);
            ids.push(id);
        }
        match parent {
            Some(p) => kids[p] = Some(ids),
            None => top = ids,
        }
        if truncated {
            break;
        }
    }
    // Children have larger ids than their parents: attach them from the last entry back.
    for id in (0..found.len()).rev() {
        if let Some(ids) = kids[id].take() {
            let children = ids
                .iter()
                .map(|&c| found[c].take().expect("one parent each"))
                .collect();
            found[id].as_mut().expect("not yet attached").children = Some(children);
        }
    }
    let structure = top
        .iter()
        .map(|&id| found[id].take().expect("a top entry"))
        .collect();
    Ok(FileStructure {
        structure,
        truncated,
        source: "runner".into(),
        detail: None,
    })
}

/// Opens a regular file without following a link, and checks that what was opened lies inside
/// `dir` (closing the race between the checks of [`resolve`] and the open).
fn open_inside(dir: &Path, at: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(at)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    inside(dir, &file)?;
    Ok(file)
}

/// Checks that an open file lies inside `dir`, by where `/proc/self/fd` says it is; answers
/// that `/proc` path (which reaches the open file itself), or `None` without `/proc`.
fn inside(dir: &Path, file: &File) -> io::Result<Option<PathBuf>> {
    use std::os::fd::AsRawFd;
    let proc = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let Ok(real) = fs::read_link(&proc) else {
        return Ok(None);
    };
    if !real.starts_with(dir.canonicalize()?) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "outside the workspace",
        ));
    }
    Ok(Some(proc))
}

/// Reads at most `max` bytes; `None` when the file holds more.
fn read_bounded(file: File, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

fn text(bytes: Vec<u8>) -> Option<String> {
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// `files/content/`: one text file, at most [`MAX_FILE_BYTES`].
pub fn read(dir: &Path, path: &str) -> Result<FileContent, FilesError> {
    let rel = checked_path(path)?;
    let shown = display_path(&rel);
    let (at, meta) = resolve(dir, &rel)?;
    let meta = meta.ok_or_else(|| refuse(format!("{shown} does not exist")))?;
    if meta.is_dir() {
        return Err(refuse(format!("{shown} is a directory")));
    }
    if !meta.is_file() {
        return Err(refuse(format!("{shown} is not a regular file")));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(refuse(format!(
            "file is over {MAX_FILE_BYTES} bytes ({} bytes)",
            meta.len()
        )));
    }
    let file = open_inside(dir, &at).map_err(|_| refuse(format!("{shown} could not be read")))?;
    let bytes = read_bounded(file, MAX_FILE_BYTES)
        .map_err(|_| refuse(format!("{shown} could not be read")))?
        .ok_or_else(|| refuse(format!("file is over {MAX_FILE_BYTES} bytes")))?;
    let size = bytes.len() as u64;
    let content = text(bytes).ok_or_else(|| refuse("binary file"))?;
    Ok(FileContent {
        path: shown,
        content,
        size,
    })
}

/// Every text file under `dir` (not `.git`, no link followed, not in installed dependencies or
/// caches such as `node_modules`), in path order. Binary files,
/// files over [`MAX_FILE_BYTES`] and files past the snapshot's budget are listed in `omitted`;
/// the snapshot's JSON stays under [`MAX_SNAPSHOT_BYTES`].
pub fn snapshot(dir: &Path) -> io::Result<WorkspaceSnapshot> {
    let mut snap = WorkspaceSnapshot::default();
    let budget = MAX_SNAPSHOT_BYTES - OMITTED_RESERVE;
    let mut used = 0usize;
    let mut omitted_bytes = 0usize;
    let mut omitted_dropped = 0usize;
    let mut omit = |snap: &mut WorkspaceSnapshot, rel: String| {
        let cost = rel.len() + 8;
        if omitted_bytes + cost <= OMITTED_RESERVE / 2 {
            omitted_bytes += cost;
            snap.omitted.push(rel);
        } else {
            omitted_dropped += 1;
        }
    };
    let mut stack: Vec<(PathBuf, String)> = vec![(dir.to_path_buf(), String::new())];
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the workspace is not a directory",
        ));
    }
    // Depth first, names in order, so the snapshot lists files in path order.
    while let Some((disk, rel)) = stack.pop() {
        let mut names: Vec<(String, Metadata)> = fs::read_dir(&disk)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if HIDDEN.contains(&name.as_str()) {
                    return None;
                }
                Some((name, fs::symlink_metadata(e.path()).ok()?))
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dirs = Vec::new();
        for (name, meta) in names {
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if meta.is_dir() {
                if !NOT_SNAPSHOTTED.contains(&name.as_str()) {
                    dirs.push((disk.join(&name), child));
                }
                continue;
            }
            if !meta.is_file() {
                continue; // links and special files are not part of a snapshot
            }
            if meta.len() > MAX_FILE_BYTES {
                omit(&mut snap, child);
                continue;
            }
            let bytes = match open_inside(dir, &disk.join(&name))
                .and_then(|f| read_bounded(f, MAX_FILE_BYTES))
            {
                Ok(Some(b)) => b,
                Ok(None) => {
                    omit(&mut snap, child);
                    continue;
                }
                Err(_) => continue, // vanished or swapped while we walked
            };
            let size = bytes.len() as u64;
            let Some(content) = text(bytes) else {
                omit(&mut snap, child);
                continue;
            };
            let file = SnapshotFile {
                path: child,
                content,
                size,
            };
            let cost = json_len(&file);
            if used.saturating_add(cost) > budget {
                omit(&mut snap, file.path);
                continue;
            }
            used += cost;
            snap.files.push(file);
        }
        // Reversed so the stack pops them in name order.
        stack.extend(dirs.into_iter().rev());
    }
    if omitted_dropped > 0 {
        tracing::warn!(
            omitted_dropped,
            "the snapshot's list of omitted files is full; more were left out unlisted"
        );
    }
    Ok(snap)
}

/// A JSON string's length once quoted and escaped as serde_json writes it.
fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// What a file adds to a snapshot's JSON: `{"path":…,"content":…,"size":N}` and a comma.
fn json_len(f: &SnapshotFile) -> usize {
    r#"{"path":,"content":,"size":},"#.len()
        + json_str_len(&f.path)
        + json_str_len(&f.content)
        + f.size.to_string().len()
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Writes a snapshot's files back under `dir`. Every path is checked first (and the whole
/// snapshot refused when one is bad); no link is followed, so nothing is written outside `dir`.
pub fn restore(dir: &Path, snap: &WorkspaceSnapshot) -> io::Result<()> {
    let mut rels = Vec::with_capacity(snap.files.len());
    for f in &snap.files {
        let rel = checked_path(&f.path)
            .map_err(|e| invalid(format!("snapshot path {:?}: {e}", f.path)))?;
        if rel.is_empty() {
            return Err(invalid("a snapshot file has an empty path".into()));
        }
        rels.push(rel);
    }
    fs::create_dir_all(dir)?;
    for (rel, f) in rels.iter().zip(&snap.files) {
        let segs: Vec<&str> = rel.split('/').collect();
        let mut at = dir.to_path_buf();
        for seg in &segs[..segs.len() - 1] {
            at.push(seg);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(invalid(format!(
                        "snapshot path {rel:?} runs through a symbolic link"
                    )));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(invalid(format!(
                        "snapshot path {rel:?} runs through a file"
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&at)?,
                Err(e) => return Err(e),
            }
        }
        at.push(segs[segs.len() - 1]);
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&at)
            .map_err(|e| invalid(format!("snapshot path {rel:?} could not be written: {e}")))?;
        out.write_all(f.content.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_files_json_length_is_computed_exactly() {
        for content in [
            "plain",
            "quote \" back \\ nl \n tab \t cr \r",
            "\u{1} \u{8} \u{c} \u{1f}",
            "ünï 😀 </script>",
        ] {
            let f = SnapshotFile {
                path: "a/\"b\".txt".into(),
                content: content.into(),
                size: 1234,
            };
            assert_eq!(
                json_len(&f),
                serde_json::to_string(&f).unwrap().len() + 1,
                "{content:?}"
            );
        }
    }

    #[test]
    fn a_directory_reached_through_a_link_lists_nothing() {
        // What `list` reads if a directory is swapped for a link after its path was checked.
        let root = tempfile::tempdir().unwrap();
        let (ws, outside) = (root.path().join("ws"), root.path().join("outside"));
        fs::create_dir_all(ws.join("real")).unwrap();
        fs::write(ws.join("real/a.txt"), "a").unwrap();
        fs::create_dir_all(outside.join("inner")).unwrap();
        fs::write(outside.join("inner/secret.txt"), "s").unwrap();
        symlink(&outside, ws.join("link")).unwrap();
        assert_eq!(entries(&ws, &ws.join("real")).len(), 1);
        assert!(
            entries(&ws, &ws.join("link")).is_empty(),
            "the last component is a link"
        );
        assert!(
            entries(&ws, &ws.join("link/inner")).is_empty(),
            "an earlier component is a link"
        );
    }
}
