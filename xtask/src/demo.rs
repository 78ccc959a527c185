//! Placeholder until the demo lands.
pub fn demo(_seconds: u32) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
