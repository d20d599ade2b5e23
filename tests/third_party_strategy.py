"""A strategy written from the `ranksearch.Strategy` docstrings alone, importing only the
public API: greedy halving. It starts with every site at the top of its grid, and each round
asks for one child per site (that site's rank halved along its grid) as a batch; it keeps the
most accurate child that was evaluated, and stops when no site can be lowered."""

import ranksearch


class GreedyHalving(ranksearch.Strategy):
    name = "greedy-halving"
    description = "lower the rank of the layer that costs the least accuracy, one at a time"

    def setup(self, ctx):
        super().setup(ctx)
        self.grids = {n: ctx.space.ranks(n, ctx.space.site(n).methods[0]) for n in ctx.space.names}
        self.current = ranksearch.Config({
            n: ranksearch.Choice(ctx.space.site(n).methods[0], grid[-1])
            for n, grid in self.grids.items()
        })
        self.waiting = False
        self.asked = []

    def children(self):
        out = []
        for name, grid in self.grids.items():
            index = grid.index(self.current[name].rank)
            if index > 0:
                lower = grid[index // 2]
                out.append(self.current.with_choices(
                    {name: ranksearch.Choice(self.current[name].method, lower)}))
        return out

    def ask(self):
        if self.waiting:  # under Ray, ask comes again before tell: wait for the batch
            return []
        batch = self.children()
        if not batch:
            raise ranksearch.StopSearch
        self.waiting = True
        self.asked.append(batch)
        return batch

    def tell(self, results):
        # fewer results than asked when the budget ran out; infeasible ones come back failed
        self.waiting = False
        scored = [r for r in results if r.ok]
        if not scored:
            raise ranksearch.StopSearch
        self.current = max(scored, key=lambda r: r.metrics["accuracy"]).config
