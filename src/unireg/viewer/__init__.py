"""Interactive HTML reports of registrations, built on NiiVue (:mod:`unireg.viewer.page`), and
the index page of an evaluation run."""
