"""Recipe steps. Every module in this package registers its steps on import (see ``registry``)."""
