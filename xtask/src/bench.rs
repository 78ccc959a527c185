//! Placeholder until the benchmark lands.
pub fn bench(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
