// Renders a Go text/template (the engine Ollama's Modelfile TEMPLATEs run in) with Ollama's
// template values: JSON {"Template", "Messages": [{"Role", "Content"}], "System"} on stdin,
// the rendered prompt on stdout.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var data struct {
		Template string
		Messages []Message
		System   string
	}
	if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(data.Template))
	values := map[string]any{"Messages": data.Messages, "System": data.System}
	if err := t.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
