"""The Mercure 0.x front door: Mercure publishers and subscribers over Sluice's store and hub."""
