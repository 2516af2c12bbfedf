"""Live loop (sources, render engines, sinks): lands with the live issue."""
