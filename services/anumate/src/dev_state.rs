//! `<data_dir>/dev.json`: how CLI commands run from the same directory find the
//! dev server and its admin token without flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name under the data directory.
pub const FILE: &str = "dev.json";

/// What `anumate dev` writes at start-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevState {
    /// `http://host:port` of the gRPC server.
    pub server: String,
    /// A dev admin token for `tenant`.
    pub token: String,
    /// Dev tenant.
    pub tenant: String,
    /// Process id of the server.
    pub pid: u32,
    /// `http://host:port` of the admin listener (health, metrics, JWKS), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin: String,
    /// `http://host:port` of the REST gateway, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// Path of the state file.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Writes the file (mode 0600: it holds a token).
pub fn write(data_dir: &Path, state: &DevState) -> std::io::Result<()> {
    let path = path(data_dir);
    let body = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    std::fs::write(&path, body)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Reads the file, if present and well-formed.
pub fn read(data_dir: &Path) -> Option<DevState> {
    let bytes = std::fs::read(path(data_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Removes the file if it was written by process `pid` (not by a newer server).
pub fn remove_if_owned(data_dir: &Path, pid: u32) {
    if read(data_dir).is_some_and(|s| s.pid == pid) {
        let _ = std::fs::remove_file(path(data_dir));
    }
}

/// Creates `dir` (and its parents) if missing and makes it private to the
/// user (0700): it holds the database, the keys and the admin token.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates `path` empty if missing, with mode 0600, or sets an existing
/// file's mode to 0600. SQLite gives its `-wal` and `-shm` files the mode of
/// the database file, so creating the database this way keeps all three private.
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(|_| ())
    }
}
