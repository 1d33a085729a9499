//! A small disk to fill: a tmpfs mounted over a directory (needs root, as in CI).

/// A tmpfs mounted over a directory for the life of the guard, so a test can fill the disk.
pub struct SmallDisk {
    /// The mount point (unmounted lazily on drop).
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. `"4m"`) over `path`, created if missing.
    pub fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root (as in CI)");
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Fills the disk with a filler file until writes fail.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        let one = vec![0u8; 512];
        while f.write_all(&one).is_ok() {}
        let _ = f.sync_all();
    }

    /// Removes the filler file: the disk has room again.
    pub fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
