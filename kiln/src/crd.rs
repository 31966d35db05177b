//! `kiln crd`: writes the ComputeJob CustomResourceDefinition generated from the types, or
//! with `--check` fails when the committed file differs from them.
use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct CrdArgs {
    /// Where the CRD goes (`-` for stdout).
    #[arg(long, default_value = "crds/computejob.yaml")]
    out: PathBuf,
    /// Do not write: exit non-zero when the file differs from the generated CRD.
    #[arg(long)]
    check: bool,
}

pub fn crd(args: CrdArgs) -> anyhow::Result<std::process::ExitCode> {
    let yaml = kiln_api::crd::crd_yaml();
    if args.out.as_os_str() == "-" {
        print!("{yaml}");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if args.check {
        let committed = std::fs::read_to_string(&args.out)
            .with_context(|| format!("reading {}", args.out.display()))?;
        if committed != yaml {
            bail!(
                "{} differs from the CRD the types in api/src generate: run `kiln crd` and commit the result",
                args.out.display()
            );
        }
        eprintln!("{} matches the types", args.out.display());
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, yaml).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}
