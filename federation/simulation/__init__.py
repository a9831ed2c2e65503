"""The simulation's test roles (adversaries, fault injection) as Flower mods, and what attacks measure."""
