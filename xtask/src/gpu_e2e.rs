//! Placeholder until gpu-e2e lands.
pub fn gpu_e2e(_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
