//! The Debian package `scripts/package` builds: installed with `dpkg -i` (as
//! root; otherwise unpacked into a scratch folder and run from there), its
//! pgreplica runs the demo, systemd accepts its unit, the daemon's user and
//! `/etc/pgreplica` are made, the manual pages and completions are there.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::text;

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn root() -> bool {
    run("id", &["-u"]).stdout.starts_with(b"0\n")
}

#[test]
fn the_package_installs_a_working_pgreplica_with_its_unit_user_and_pages() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(manifest.join("scripts/package").to_str().unwrap(), &[]);
    assert!(
        out.status.success(),
        "scripts/package failed:\n{}",
        text(&out)
    );
    let deb = manifest.join(String::from_utf8_lossy(&out.stdout).trim());
    let deb = deb.to_str().unwrap();
    let listed = text(&run("dpkg-deb", &["--contents", deb]));
    for file in [
        "./usr/bin/pgreplica",
        "./lib/systemd/system/pgreplica.service",
        "./etc/pgreplica/shop.conf.example",
        "./usr/share/man/man1/pgreplica.1.gz",
        "./usr/share/man/man1/pgreplica-switchover.1.gz",
        "./usr/share/bash-completion/completions/pgreplica",
        "./usr/share/zsh/vendor-completions/_pgreplica",
        "./usr/share/pgreplica/sql/pgreplica.sql",
        "./usr/share/pgreplica/prometheus/pgreplica-rules.yml",
    ] {
        assert!(
            listed.contains(file),
            "{file} is not in the package:\n{listed}"
        );
    }

    let (prefix, installed) = match root() {
        true => {
            let out = run("dpkg", &["-i", deb]);
            assert!(out.status.success(), "dpkg -i:\n{}", text(&out));
            (PathBuf::from("/"), true)
        }
        false => {
            let scratch =
                std::env::temp_dir().join(format!("pgreplica-deb-{}", std::process::id()));
            let out = run("dpkg-deb", &["-x", deb, scratch.to_str().unwrap()]);
            assert!(out.status.success(), "dpkg-deb -x:\n{}", text(&out));
            (scratch, false)
        }
    };
    let bin = prefix.join("usr/bin/pgreplica");
    let bin = bin.to_str().unwrap();
    let version = text(&run(bin, &["--version"]));
    assert!(version.starts_with("pgreplica "), "{version}");
    let demo = run(bin, &["demo"]);
    assert!(
        demo.status.success(),
        "the packaged demo failed:\n{}",
        text(&demo)
    );
    assert!(
        text(&demo).contains("byte-equal to the master"),
        "{}",
        text(&demo)
    );
    let unit = prefix.join("lib/systemd/system/pgreplica.service");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(unit_text.contains("ExecStart=/usr/bin/pgreplica run --config-dir /etc/pgreplica"));
    // The sample parses as a set (it is not a *.conf: the service ignores it).
    let sample = prefix.join("etc/pgreplica/shop.conf.example");
    assert!(pgreplica::Config::load(&sample).is_ok());

    if installed {
        let user = run("getent", &["passwd", "pgreplica"]);
        assert!(user.status.success(), "no pgreplica user");
        let verify = run("systemd-analyze", &["verify", unit.to_str().unwrap()]);
        // Where systemd-analyze exists, it must accept the unit.
        assert!(
            verify.status.success(),
            "systemd-analyze verify:\n{}",
            text(&verify)
        );
        let man = run("man", &["-w", "pgreplica-switchover"]);
        assert!(man.status.success(), "man -w:\n{}", text(&man));
        let out = run("dpkg", &["--purge", "pgreplica"]);
        assert!(out.status.success(), "dpkg --purge:\n{}", text(&out));
        assert!(!Path::new("/usr/bin/pgreplica").exists());
    } else {
        eprintln!("not root: the package was unpacked, not installed with dpkg -i");
        std::fs::remove_dir_all(&prefix).ok();
    }
}
