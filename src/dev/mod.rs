#[derive(Debug, clap::Args)]
pub struct DevArgs {}
pub async fn run(_args: DevArgs) -> anyhow::Result<()> { Ok(()) }
